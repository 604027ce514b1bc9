"""Rewards by name: math_exact, code_exec, end_of_turn, and their weighted combination."""

import numpy as np
import pytest

from data import rewards

EOT = "<end_of_turn>"


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (f"The answer is 12{EOT}", "12", 1.0),
        (f"3 apples and 4 pears, so 12.{EOT}\nand 13 more after the turn", "12", 1.0),
        ("Step 1: 5 - 8 = -3\n#### -3", "-3", 1.0),
        ("so the total is 1,234", "1234", 1.0),
        ("so the total is $1,234", "1,234", 1.0),
        ("x = 3.0", "3", 1.0),
        ("x = 3", "3.0", 1.0),
        ("x = 3.5", "3", 0.0),
        ("first 12 then 13", "12", 0.0),
        ("no number here", "12", 0.0),
        ("", "12", 0.0),
        ("-3", "3", 0.0),
    ],
)
def test_math_exact(completion, answer, expected):
    got = rewards.math_exact(examples=[{"prompt": "q", "answer": answer}], completions=[completion])
    assert got.dtype == np.float32 and got.shape == (1,)
    assert got[0] == expected


def test_math_exact_needs_a_numeric_answer():
    with pytest.raises(ValueError, match="answer"):
        rewards.math_exact(examples=[{"prompt": "q"}], completions=["1"])
    with pytest.raises(ValueError, match="no number"):
        rewards.math_exact(examples=[{"prompt": "q", "answer": "seven"}], completions=["7"])


def test_code_exec():
    example = {"prompt": "write add", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    good = f"Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.{EOT}"
    bad = f"```python\ndef add(a, b):\n    return a * b\n```{EOT}"
    hostile = "```python\nimport os\nos.fork()\ndef add(a, b):\n    return a + b\n```"
    got = rewards.code_exec(
        examples=[example] * 3, completions=[good, bad, hostile], timeout_s=2.0, workers=2
    )
    np.testing.assert_array_equal(got, np.array([1, 0, 0], np.float32))


def test_end_of_turn():
    got = rewards.end_of_turn(examples=[{}] * 3, completions=[f"ok{EOT}", f"ok{EOT}\n", "ok"])
    np.testing.assert_array_equal(got, [1, 1, 0])


def test_combine_weights_and_missing_key():
    parts = {"a": np.array([1, 0], np.float32), "b": np.array([0.5, 1], np.float32)}
    total = rewards.combine(rewards=parts, weights={"a": 2.0, "b": -1.0})
    np.testing.assert_allclose(total, [1.5, -1.0])
    assert total.dtype == np.float32
    with pytest.raises(KeyError, match="'c'"):
        rewards.combine(rewards=parts, weights={"a": 1.0, "c": 1.0})


def test_compute_rewards_uses_registry_extra_and_options():
    examples = [{"prompt": "q", "answer": "4"}, {"prompt": "q", "answer": "5"}]
    completions = [f"2 + 2 = 4{EOT}", "it is 6"]
    seen = {}

    def reward_model(*, examples, completions, scale=1.0):
        seen["scale"] = scale
        return np.full(len(completions), 0.25 * scale)

    total, parts = rewards.compute_rewards(
        specs={"math_exact": 1.0, "end_of_turn": 0.5, "reward_model": 2.0},
        examples=examples,
        completions=completions,
        extra={"reward_model": reward_model},
        options={"reward_model": {"scale": 2.0}},
    )
    np.testing.assert_allclose(parts["math_exact"], [1, 0])
    np.testing.assert_allclose(parts["end_of_turn"], [1, 0])
    np.testing.assert_allclose(parts["reward_model"], [0.5, 0.5])
    np.testing.assert_allclose(total, [1 + 0.5 + 1, 0 + 0 + 1])
    assert total.dtype == np.float32 and seen["scale"] == 2.0


def test_compute_rewards_errors():
    ex, comp = [{"prompt": "q", "answer": "1"}], ["1"]
    with pytest.raises(ValueError, match="unknown rewards.*'nope'.*valid.*math_exact"):
        rewards.compute_rewards(specs={"nope": 1.0}, examples=ex, completions=comp)
    with pytest.raises(ValueError, match="reward_model"):
        rewards.compute_rewards(specs={"reward_model": 1.0}, examples=ex, completions=comp)
    with pytest.raises(ValueError, match="not used"):
        rewards.compute_rewards(
            specs={"math_exact": 1.0}, examples=ex, completions=comp, options={"code_exec": {}}
        )
    with pytest.raises(ValueError, match="shape"):
        rewards.compute_rewards(
            specs={"bad": 1.0},
            examples=ex,
            completions=comp,
            extra={"bad": lambda **_: np.zeros(3)},
        )


def test_check_reward_names():
    assert rewards.check_reward_names(["math_exact", "code_exec", "reward_model"]) == []
    errors = rewards.check_reward_names(["math_exact", "mathexact"])
    assert len(errors) == 1 and "'mathexact'" in errors[0] and "math_exact" in errors[0]


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("math_exact")(lambda **_: np.zeros(0))
