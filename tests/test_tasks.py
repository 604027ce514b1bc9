"""Tests for data/tasks.py: chat template and mask, SFT packing, batch order, JSONL, tasks.

Uses the real BPE (vocab 4096 on the KJV, trained once per module into a temporary cache);
`PYTHONPATH=. python -m pytest tests/test_tasks.py -q`.
"""

import json

import numpy as np
import pytest

from data import tasks
from data.tokenizer import BOS_ID, END_OF_TURN, PAD_ID, load_tokenizer

SOT_ID, EOT_ID = 4, 5
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return load_tokenizer(kind="bpe", train_on="kjv", vocab_size=4096, cache_dir=str(cache))


TWO_TURNS = [{"role": "user", "content": "What is 7 + 12?"}, {"role": "model", "content": "19"}]
MULTI_TURNS = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "model", "content": "2 + 3 = 5"},
]


def learned_text(tok, ids, mask):
    """The decoded masked tokens, split where the mask is interrupted."""
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


# ---- chat template ---------------------------------------------------------------------------


def test_template_layout_exact(tok):
    ids, mask = tasks.format_chat(turns=TWO_TURNS, tokenizer=tok)
    enc = tok.encode
    user = [SOT_ID, *enc("user\n"), *enc("What is 7 + 12?"), EOT_ID, *enc("\n")]
    model = [SOT_ID, *enc("model\n"), *enc("19"), EOT_ID, *enc("\n")]
    want = [BOS_ID, *user, *model]
    assert ids == want
    assert tok.token_to_id("<start_of_turn>") == SOT_ID and tok.token_to_id(END_OF_TURN) == EOT_ID
    assert ids.count(BOS_ID) == 1 and ids.count(SOT_ID) == 2 and ids.count(EOT_ID) == 2
    text = tok.decode(ids)
    assert text == (
        "<bos><start_of_turn>user\nWhat is 7 + 12?<end_of_turn>\n"
        "<start_of_turn>model\n19<end_of_turn>\n"
    )
    assert tasks.parse_chat(text) == TWO_TURNS
    # Mask: exactly "19" + <end_of_turn>.
    assert sum(mask) == len(enc("19")) + 1
    assert learned_text(tok, ids, mask) == ["19<end_of_turn>"]
    assert mask[0] == 0 and mask[-1] == 0


def test_template_multi_turn_mask_and_round_trip(tok):
    ids, mask = tasks.format_chat(turns=MULTI_TURNS, tokenizer=tok)
    assert len(ids) == len(mask)
    assert learned_text(tok, ids, mask) == [
        "Hi! How can I help?<end_of_turn>",
        "2 + 3 = 5<end_of_turn>",
    ]
    # Every learned token is model content or an <end_of_turn> closing a model turn.
    eots = [k for k, i in enumerate(ids) if i == EOT_ID]
    assert [mask[k] for k in eots] == [0, 1, 0, 1]
    normalized = [
        dict(t, role="model" if t["role"] == "assistant" else t["role"]) for t in MULTI_TURNS
    ]
    assert tasks.parse_chat(tok.decode(ids)) == normalized


def test_generation_prompt_and_completion(tok):
    ids = tasks.prompt_ids(prompt="What is 7 + 12?", tokenizer=tok)
    assert ids[-1 - len(tok.encode("model\n")) :] == [SOT_ID, *tok.encode("model\n")]
    full, _ = tasks.format_chat(turns=TWO_TURNS, tokenizer=tok)
    assert full[: len(ids)] == ids  # the prompt is a prefix of the training example
    assert tasks.parse_chat(tok.decode(ids)) == [
        {"role": "user", "content": "What is 7 + 12?"},
        {"role": "model", "content": ""},
    ]
    sampled = [*tok.encode("19"), EOT_ID, *tok.encode("junk")]
    assert tasks.completion_text(ids=sampled, tokenizer=tok) == "19"
    assert tasks.completion_text(ids=np.array([*tok.encode("4"), 1, 7]), tokenizer=tok) == "4"
    assert tasks.completion_text(ids=tok.encode("no stop"), tokenizer=tok) == "no stop"


def test_system_turn_merges_into_first_user_turn(tok):
    turns = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]
    ids, mask = tasks.format_chat(turns=turns, tokenizer=tok)
    merged = [{"role": "user", "content": "Answer briefly.\n\nWhat is 7 + 12?"}, TWO_TURNS[1]]
    assert ids == tasks.format_chat(turns=merged, tokenizer=tok)[0]
    assert tasks.parse_chat(tok.decode(ids)) == merged
    assert learned_text(tok, ids, mask) == ["19<end_of_turn>"]


@pytest.mark.parametrize(
    "turns, match",
    [
        ([{"role": "narrator", "content": "x"}], "narrator"),
        ([{"role": "model", "content": "x"}], "alternate"),
        ([TWO_TURNS[0], TWO_TURNS[0]], "alternate"),
        ([TWO_TURNS[0], {"role": "system", "content": "x"}], "system"),
        ([{"role": "system", "content": "x"}], "system"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "a<end_of_turn>b"}], "marker"),
    ],
)
def test_bad_turns_raise(tok, turns, match):
    with pytest.raises(ValueError, match=match):
        tasks.format_chat(turns=turns, tokenizer=tok)


def test_parse_chat_rejects_text_outside_turns():
    with pytest.raises(ValueError, match="outside a turn"):
        tasks.parse_chat("hello<start_of_turn>user\nhi<end_of_turn>\n")


# ---- packing ---------------------------------------------------------------------------------


def check_row_invariants(batch, pad_id=PAD_ID):
    seg, pos, lm = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    assert {k: batch[k].dtype for k in FIELDS} == {
        "inputs": np.int32,
        "targets": np.int32,
        "loss_mask": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    for r in range(len(seg)):
        for s in np.unique(seg[r]):
            where = np.flatnonzero(seg[r] == s)
            assert (np.diff(where) == 1).all()  # segments are contiguous
            if s:
                np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
        # No loss from the last token of a segment (its next token is another example's).
        last = np.r_[seg[r, 1:] != seg[r, :-1], True]
        inner_last = last & (seg[r] > 0) & (np.arange(seg.shape[1]) < seg.shape[1] - 1)
        assert (lm[r, inner_last] == 0).all()
        assert (batch["targets"][r, inner_last] == pad_id).all()
    assert (lm[seg == 0] == 0).all() and (batch["inputs"][seg == 0] == pad_id).all()


def test_pack_alignment_and_boundaries(tok):
    examples = [
        {"prompt": f"What is {a} + {b}?", "response": str(a + b)} for a, b in [(1, 2), (7, 12)]
    ] + [{"messages": MULTI_TURNS}]
    rows = tasks.sft_rows(examples=examples, tokenizer=tok, seq_len=64)
    assert rows["inputs"].shape == (len(rows["inputs"]), 64)
    check_row_invariants(rows)
    # Segment by segment, the masked targets are exactly the replies + <end_of_turn>.
    got = []
    for r in range(len(rows["inputs"])):
        for s in range(1, rows["segment_ids"][r].max() + 1):
            sel = (rows["segment_ids"][r] == s) & (rows["loss_mask"][r] == 1)
            got.append(tok.decode(rows["targets"][r, sel]))
    assert sorted(got) == sorted(
        [
            "3<end_of_turn>",
            "19<end_of_turn>",
            "Hi! How can I help?<end_of_turn>2 + 3 = 5<end_of_turn>",
        ]
    )
    # Inputs of a segment are the formatted example minus its last token.
    ids, _ = tasks.format_chat(turns=tasks.example_turns(examples[0]), tokenizer=tok)
    sel = rows["segment_ids"][0] == 1
    assert rows["inputs"][0, sel].tolist() == ids


def test_pack_first_fit_exact():
    # Rows of seq_len + 1 = 6 tokens; b does not fit after a, so it opens row 1, where d goes
    # once row 0 is too full for it.
    ex = lambda n, start: (list(range(start, start + n)), [1] * n)  # noqa: E731
    examples = [ex(3, 10), ex(4, 20), ex(2, 30), ex(2, 40), ex(1, 50)]
    b = tasks.pack_examples(examples=examples, seq_len=5, pad_id=0)
    # Row 0: 10 11 12 30 31 50 ; row 1: 20 21 22 23 40 41 (first fit, input order within a row)
    assert b["inputs"].tolist() == [[10, 11, 12, 30, 31], [20, 21, 22, 23, 40]]
    assert b["targets"].tolist() == [[11, 12, 0, 31, 0], [21, 22, 23, 0, 41]]
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1, 0], [1, 1, 1, 0, 1]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    check_row_invariants(b, pad_id=0)
    # The mask of token t+1 applies to predicting it; padding gets none.
    b = tasks.pack_examples(examples=[([7, 8, 9], [0, 1, 0])], seq_len=5, pad_id=0)
    assert b["inputs"].tolist() == [[7, 8, 9, 0, 0]]
    assert b["targets"].tolist() == [[8, 9, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[1, 0, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 0, 0]]


def test_pack_truncates_long_examples():
    long = (list(range(100, 120)), [1] * 20)
    b = tasks.pack_examples(examples=[long, ([5, 6], [0, 1])], seq_len=7, pad_id=0)
    assert b["inputs"][0].tolist() == list(range(100, 107))
    assert b["targets"][0].tolist() == list(range(101, 108))  # 8 = seq_len + 1 tokens kept
    assert b["loss_mask"][0].tolist() == [1] * 7
    assert b["inputs"][1].tolist()[:2] == [5, 6] and b["loss_mask"][1].tolist()[0] == 1
    with pytest.raises(ValueError, match="mask"):
        tasks.pack_examples(examples=[([1, 2], [1])], seq_len=4)


def test_pack_deterministic_and_many(tok):
    train = tasks.make_task("arithmetic", split="train", n=300, seed=0)
    a = tasks.sft_rows(examples=train, tokenizer=tok, seq_len=64)
    b = tasks.sft_rows(examples=train, tokenizer=tok, seq_len=64)
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
    check_row_invariants(a)
    # Every example is in once: segments (one per example) and learned tokens add up.
    assert sum(int(s.max()) for s in a["segment_ids"]) == 300
    assert a["loss_mask"].sum() == sum(len(tok.encode(e["response"])) + 1 for e in train)


# ---- batches ---------------------------------------------------------------------------------


def test_get_batch_deterministic_and_covers_epochs():
    n_rows = 10
    rows = {k: np.arange(n_rows * 4, dtype=np.int32).reshape(n_rows, 4) for k in FIELDS}
    take = lambda i: tasks.get_batch(rows, batch_size=4, seed=3, index=i)  # noqa: E731
    first = [take(i)["inputs"][:, 0] // 4 for i in range(5)]  # 20 rows = 2 epochs
    again = [take(i)["inputs"][:, 0] // 4 for i in range(5)]
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    stream = np.concatenate(first)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a new order each epoch
    np.testing.assert_array_equal(stream[:10], np.random.default_rng((3, 0)).permutation(n_rows))
    # The generator resumes at any batch index with the same batches.
    gen = tasks.batches(rows, batch_size=4, seed=3, start_batch=2)
    for i in range(2, 5):
        np.testing.assert_array_equal(next(gen)["inputs"], take(i)["inputs"])
    other = tasks.get_batch(rows, batch_size=4, seed=4, index=0)["inputs"]
    assert not np.array_equal(other, take(0)["inputs"])


# ---- JSONL -----------------------------------------------------------------------------------


def test_load_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        {"prompt": "Hi", "response": "Hello"},
        {"messages": MULTI_TURNS, "answer": "5"},
        {"prompt": "2+2", "answer": "4", "tests": []},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = tasks.load_jsonl(path)
    assert [g["id"] for g in got] == ["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3"]
    assert got[1]["messages"] == MULTI_TURNS


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", "bad JSON"),
        ("[1, 2]", "JSON object"),
        ('{"response": "x"}', "missing key 'prompt'"),
        ('{"prompt": "x"}', "'response'"),
        ('{"prompt": 3, "response": "x"}', "'prompt' must be a string"),
        ('{"prompt": "x", "response": "y", "extra": 1}', "unknown keys"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "'bot'"),
        ('{"messages": []}', "non-empty"),
        ('{"prompt": "x", "answer": "1", "tests": "assert 1"}', "'tests'"),
    ],
)
def test_load_jsonl_errors_name_line(tmp_path, bad, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=match) as e:
        tasks.load_jsonl(path)
    assert f"{path}:3:" in str(e.value)


def test_jsonl_task_splits(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(200))
    )
    train = tasks.make_task("jsonl", split="train", n=150, seed=0, path=str(path))
    test = tasks.make_task("jsonl", split="test", n=5, seed=0, path=str(path))
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    test_path = tmp_path / "held.jsonl"
    test_path.write_text(json.dumps({"prompt": "held", "response": "out"}))
    got = tasks.make_task(
        "jsonl", split="test", n=1, seed=0, path=str(path), test_path=str(test_path)
    )
    assert got[0]["prompt"] == "held"
    with pytest.raises(ValueError, match="test split has 1"):
        tasks.make_task(
            "jsonl", split="test", n=2, seed=0, path=str(path), test_path=str(test_path)
        )


# ---- tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("arithmetic", {}),
        ("arithmetic", {"min_value": -9, "max_value": 99, "ops": "+-*", "terms": 4}),
        ("chain_sum", {}),
        ("chain_sum", {"terms": 5, "ops": "+-"}),
    ],
)
def test_number_tasks(name, options):
    train = tasks.make_task(name, split="train", n=400, seed=1, **options)
    test = tasks.make_task(name, split="test", n=60, seed=1, **options)
    assert train == tasks.make_task(name, split="train", n=400, seed=1, **options)
    assert train != tasks.make_task(name, split="train", n=400, seed=2, **options)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    for e in train + test:
        assert set(e) == {"id", "prompt", "answer", "response"}
        expr = e["prompt"].removeprefix("What is ").removesuffix("?").removesuffix(" =")
        assert e["answer"] == e["response"] == str(eval(expr))  # noqa: S307
    assert len({e["id"] for e in train}) == len(train)


def test_small_problem_space_still_disjoint():
    # 0..3 with + : 16 problems; asking for more than exist repeats but never crosses splits.
    opts = {"max_value": 3, "ops": "+"}
    train = tasks.make_task("arithmetic", split="train", n=50, seed=0, **opts)
    test_prompts = set()
    for seed in range(5):
        try:
            test_prompts |= {
                e["prompt"]
                for e in tasks.make_task("arithmetic", split="test", n=3, seed=seed, **opts)
            }
        except ValueError:
            pass  # this tiny space may have no test problem at all
    assert len(train) == 50
    assert not {e["prompt"] for e in train} & test_prompts


def test_code_task():
    train = tasks.make_task("code", split="train", n=9, seed=0)
    test = tasks.make_task("code", split="test", n=3, seed=0)
    assert len({e["id"] for e in train}) == 9 and len({e["id"] for e in test}) == 3
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert tasks.make_task("code", split="train", n=9, seed=0) == train
    assert len(tasks.make_task("code", split="train", n=20, seed=0)) == 20  # train cycles
    for e in train + test:
        assert e["response"] == f"```python\n{e['answer']}\n```"
        namespace = {}
        exec(e["answer"], namespace)  # noqa: S102 - our own reference solutions
        for t in e["tests"]:
            exec(t, namespace)  # noqa: S102
    with pytest.raises(ValueError, match="test split has 3"):
        tasks.make_task("code", split="test", n=4, seed=0)


def test_check_task_and_make_task_errors():
    assert tasks.check_task("arithmetic", {"max_value": 50, "ops": "+-*"}) == []
    assert tasks.check_task("jsonl", {"path": "x.jsonl"}) == []
    (err,) = tasks.check_task("algebra", {})
    assert "algebra" in err and "arithmetic" in err and "chain_sum" in err
    (err,) = tasks.check_task("arithmetic", {"max_val": 5})
    assert "max_val" in err and "max_value" in err
    (err,) = tasks.check_task("jsonl", {})
    assert "path" in err
    (err,) = tasks.check_task("chain_sum", {"ops": "+/"})
    assert "ops" in err
    (err,) = tasks.check_task("arithmetic", {"min_value": 5, "max_value": 1})
    assert "min_value" in err
    with pytest.raises(ValueError, match="max_val"):
        tasks.make_task("arithmetic", split="train", n=1, seed=0, max_val=5)
    with pytest.raises(ValueError, match="split"):
        tasks.make_task("arithmetic", split="valid", n=1, seed=0)
    with pytest.raises(ValueError, match="n="):
        tasks.make_task("arithmetic", split="train", n=0, seed=0)


def test_wrong_fraction_corrupts_responses_but_never_answers():
    clean = tasks.make_task("arithmetic", split="train", n=400, seed=3)
    noisy = tasks.make_task("arithmetic", split="train", n=400, seed=3, wrong_fraction=0.3)
    assert [e["answer"] for e in clean] == [e["answer"] for e in noisy]
    wrong = [e for e in noisy if e["response"] != e["answer"]]
    assert 0.2 < len(wrong) / len(noisy) < 0.4
    assert all(1 <= abs(int(e["response"]) - int(e["answer"])) <= 3 for e in wrong)
    assert noisy == tasks.make_task("arithmetic", split="train", n=400, seed=3, wrong_fraction=0.3)
    assert tasks.check_task("arithmetic", {"wrong_fraction": 1.5})
    assert not tasks.check_task("arithmetic", {"wrong_fraction": 0.3})


def test_hedge_fraction_adds_a_wrong_second_guess():
    from data.rewards import math_exact

    ex = tasks.make_task("arithmetic", split="train", n=400, seed=3, hedge_fraction=0.3)
    hedged = [e for e in ex if e["response"] != e["answer"]]
    assert 0.2 < len(hedged) / len(ex) < 0.4
    assert all(e["response"].startswith(e["answer"] + ", or maybe ") for e in hedged)
    scores = math_exact(examples=ex, completions=[e["response"] for e in ex])
    assert scores.sum() == len(ex) - len(hedged)  # the last number decides: hedges score 0
    assert tasks.check_task("arithmetic", {"hedge_fraction": 0.5, "wrong_fraction": 0.5})
