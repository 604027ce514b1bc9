"""Rewards for RL, picked by registered name and summed with weights from the config.

An example is a dict with `prompt` (str) and, as the reward needs them, `answer` (math ground
truth), `tests` (Python asserts for a code task) and `response` (a reference response). A
reward function is keyword-only and returns one float32 per completion:

    fn(*, examples: list[dict], completions: list[str], **options) -> np.ndarray [n]

    from data import rewards
    total, parts = rewards.compute_rewards(
        specs={"math_exact": 1.0, "end_of_turn": 0.1},
        examples=[{"prompt": "2+2?", "answer": "4"}],
        completions=["2 + 2 = 4<end_of_turn>"],
    )   # total [1.1], parts {"math_exact": [1.0], "end_of_turn": [1.0]}

Registered: math_exact (last number of the answer equals the ground truth), code_exec (the
fenced code passes the example's tests in data.sandbox), end_of_turn (the completion ends its
turn). The RL stage passes its learned scorer as `extra={"reward_model": fn}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np

from data import sandbox
from data.tokenizer import END_OF_TURN

RewardFn = Callable[..., np.ndarray]
REWARDS: dict[str, RewardFn] = {}
# Supplied at run time by the RL stage through `extra`, so valid in configs but not registered.
RUNTIME_REWARDS = ("reward_model",)


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return add


# Optional minus, digits with optional comma thousands separators, optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)|-?\.\d+")


def last_number(text: str) -> Fraction | None:
    """The last number in `text` before any end-of-turn marker, exactly; None if there is none."""
    numbers = _NUMBER.findall(text.split(END_OF_TURN, 1)[0])
    return Fraction(numbers[-1].replace(",", "")) if numbers else None


def _check_lengths(examples: list[dict], completions: list[str]) -> None:
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")


def _field(examples: list[dict], key: str, reward: str) -> list[str]:
    missing = [i for i, ex in enumerate(examples) if key not in ex]
    if missing:
        raise ValueError(f"reward {reward!r} needs {key!r}, missing in examples {missing[:10]}")
    return [ex[key] for ex in examples]


@register("math_exact")
def math_exact(*, examples: list[dict], completions: list[str]) -> np.ndarray:
    """1 where the last number of the completion equals the example's `answer` numerically."""
    _check_lengths(examples, completions)
    out = np.zeros(len(completions), np.float32)
    answers = _field(examples, "answer", "math_exact")
    for i, (answer, completion) in enumerate(zip(answers, completions, strict=True)):
        truth = last_number(str(answer))
        if truth is None:
            raise ValueError(f"math_exact: example {i} has no number in its answer {answer!r}")
        out[i] = float(last_number(completion) == truth)
    return out


@register("code_exec")
def code_exec(
    *,
    examples: list[dict],
    completions: list[str],
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    workers: int = 2,
) -> np.ndarray:
    """1 where the completion's (fenced) code passes the example's `tests` in the sandbox."""
    _check_lengths(examples, completions)
    results = sandbox.run_many(
        codes=[sandbox.extract_code(c) for c in completions],
        tests=_field(examples, "tests", "code_exec"),
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        workers=workers,
    )
    return np.array([r.passed for r in results], np.float32)


@register("end_of_turn")
def end_of_turn(*, examples: list[dict], completions: list[str]) -> np.ndarray:
    """1 where the completion closes its turn (ends with the end-of-turn marker)."""
    _check_lengths(examples, completions)
    return np.array([c.rstrip().endswith(END_OF_TURN) for c in completions], np.float32)


def combine(*, rewards: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """sum_name weights[name] * rewards[name], float32 [n]."""
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise KeyError(f"weights name rewards that were not computed: {missing}")
    if not weights:
        raise ValueError("combine needs at least one weighted reward")
    total = sum(
        np.float32(w) * np.asarray(rewards[name], np.float32) for name, w in weights.items()
    )
    return np.asarray(total, np.float32)


def compute_rewards(
    *,
    specs: dict[str, float],
    examples: list[dict],
    completions: list[str],
    extra: dict[str, RewardFn] | None = None,
    options: dict[str, dict] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each named reward (from `extra`, else REWARDS) with its options, and their weighted sum.

    Returns (total float32 [n], {name: float32 [n]}).
    """
    extra = extra or {}
    options = options or {}
    _check_lengths(examples, completions)
    unknown = [name for name in specs if name not in extra and name not in REWARDS]
    if unknown:
        valid = sorted(set(REWARDS) | set(extra))
        raise ValueError(f"unknown rewards {unknown}; valid: {valid}")
    stray = sorted(set(options) - set(specs))
    if stray:
        raise ValueError(f"options given for rewards that are not used: {stray}")
    parts = {}
    for name in specs:
        fn = extra.get(name) or REWARDS[name]
        values = np.asarray(
            fn(examples=examples, completions=completions, **options.get(name, {})), np.float32
        )
        if values.shape != (len(completions),):
            raise ValueError(
                f"reward {name!r} returned shape {values.shape}, expected ({len(completions)},)"
            )
        parts[name] = values
    return combine(rewards=parts, weights=specs), parts


def check_reward_names(names: Iterable[str]) -> list[str]:
    """Error messages for names that are neither registered nor supplied at run time."""
    valid = sorted(set(REWARDS) | set(RUNTIME_REWARDS))
    return [f"unknown reward {name!r}; valid: {valid}" for name in names if name not in valid]
