"""The reward_model stage: preference pairs, rows, config checks, and end to end a reward model
that learns held-out pairs, two WARM members merged by averaging, and the scorer for RL."""

import copy
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from data.tokenizer import END_OF_TURN
from recipes import reward_model as rm
from tests.conftest import write_kjv_corpus
from train.config import ConfigError, parse_config

TINY = {
    "preset": "gemma3-tiny",
    "num_layers": 2,
    "layer_pattern": ["local", "global"],
    "sliding_window": 8,
    "d_model": 32,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
    "ffw_dim": 64,
}
# answers 0..18, wrong ones off by up to 20: mostly out of range, learnable in a few seconds
TASK = {"name": "arithmetic", "options": {"max_value": 9, "ops": "+"}, "train_size": 500}


def reward_stage(**kw) -> dict:
    return {
        "kind": "reward_model",
        "model": "m",
        "task": {**TASK, "test_size": 64},
        "pairs": {"source": "corrupted", "max_offset": 20},
        "data": {"seq_len": 32, "batch_size": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "steps": 60,
        "eval": {"every": 0, "batches": 8},
        **kw,
    }


def pipeline_raw(workdir: Path, name: str) -> dict:
    corpus = {"text": str(workdir / "corpus.txt")}
    return {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 10},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {"m": TINY},
        "stages": {
            "rm": reward_stage(),
            "rm_a": reward_stage(seed=1, steps=3),
            "rm_b": reward_stage(seed=2, steps=3, optim={"lr": 1e-3, "warmup_steps": 0}),
            "rm_warm": {"kind": "merge", "model": "m", "sources": ["rm_a", "rm_b"]},
        },
    }


class FakeTokenizer:
    """Characters as ids, with the chat template's control tokens."""

    bos_id, eos_id, pad_id = 1, 2, 0
    special = {"<start_of_turn>": 3, END_OF_TURN: 4}

    def token_to_id(self, token):
        return self.special.get(token)

    def encode(self, text):
        return [10 + ord(c) for c in text]


# ---------------------------------------------------------------------------------------------
# pairs, rows, config


def test_corrupted_pairs_are_wrong_and_deterministic():
    examples = [
        {"id": f"e{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1), "response": str(i + 1)}
        for i in range(50)
    ]
    pairs = rm.corrupted_pairs(examples, seed=3, max_offset=4)
    assert pairs == rm.corrupted_pairs(examples, seed=3, max_offset=4)
    assert pairs != rm.corrupted_pairs(examples, seed=4, max_offset=4)
    offsets = [int(p["rejected"]) - int(p["chosen"]) for p in pairs]
    assert all(1 <= abs(o) <= 4 for o in offsets) and {-1, 1} <= {np.sign(o) for o in offsets}
    assert [p["chosen"] for p in pairs] == [ex["response"] for ex in examples]
    wordy = {"id": "w", "prompt": "p", "answer": "12", "response": "So 12 it is: 12."}
    (p,) = rm.corrupted_pairs([wordy], seed=0, max_offset=1)
    assert p["rejected"] in ("So 12 it is: 11.", "So 12 it is: 13.")
    with pytest.raises(ValueError, match="integer answer"):
        rm.corrupted_pairs([{**wordy, "answer": "twelve"}], seed=0, max_offset=1)


def test_load_pairs_errors_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert rm.load_pairs(str(path)) == [good, good]
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected an object with exactly keys"):
        rm.load_pairs(str(path))
    path.write_text("{bad\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: bad JSON"):
        rm.load_pairs(str(path))
    path.write_text(json.dumps({**good, "chosen": 3}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: \['chosen'\] must be strings"):
        rm.load_pairs(str(path))


def test_pair_rows_layout():
    tok = FakeTokenizer()
    pairs = [{"prompt": "hi", "chosen": "12", "rejected": "7"}]
    rows = rm.pair_rows(pairs, tokenizer=tok, seq_len=24)
    assert rows["inputs"].shape == (1, 2, 24) and rows["last"].shape == (1, 2)
    for j, text in enumerate(("12", "7")):
        last = rows["last"][0, j]
        ids = rows["inputs"][0, j]
        assert ids[0] == tok.bos_id and ids[last] == tok.special[END_OF_TURN]
        assert list(ids[last - len(text) : last]) == tok.encode(text)
        np.testing.assert_array_equal(rows["segment_ids"][0, j], np.arange(24) <= last)
        np.testing.assert_array_equal(
            rows["positions"][0, j], np.where(np.arange(24) <= last, np.arange(24), 0)
        )
        assert (ids[last + 1 :] == tok.pad_id).all()
    with pytest.raises(ValueError, match="raise data.seq_len"):
        rm.pair_rows(pairs, tokenizer=tok, seq_len=10)


def test_config_validation():
    raw = pipeline_raw(Path("/nonexistent"), "v")
    cfg = parse_config(raw, num_devices=8)
    assert cfg.stages["rm_a"].seed == 1 and cfg.stages["rm"].seed == 0
    assert rm.is_reward_model(cfg, "rm") and rm.is_reward_model(cfg, "rm_warm")

    def fails(change, *expected):
        bad = copy.deepcopy(raw)
        change(bad)
        with pytest.raises(ConfigError) as e:
            parse_config(bad, source="x.yaml", num_devices=8)
        for text in expected:
            assert text in str(e.value), str(e.value)

    fails(lambda r: r["stages"]["rm"].update(pairs={"source": "jsonl"}), "needs pairs.path")
    fails(
        lambda r: r["stages"]["rm"].update(pairs={"source": "corrupted", "path": "x"}),
        "source 'jsonl' only",
    )
    fails(lambda r: r["stages"]["rm"].update(data={"batch_size": 12}), "multiple of")
    fails(lambda r: r["stages"]["rm"].update(init={"stage": "nope"}), "unknown stage")


# ---------------------------------------------------------------------------------------------
# end to end


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


@pytest.mark.slow
def test_reward_models_learn_merge_and_score(tmp_path):
    from train.pipeline import Manifest, StageContext, run_pipeline

    write_kjv_corpus(tmp_path, 20)
    cfg = parse_config(pipeline_raw(tmp_path, "rm"), num_devices=8)
    assert run_pipeline(cfg, log=lambda *_: None) == 0
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())["stages"]
    assert all(manifest[s]["status"] == "done" for s in cfg.order), manifest

    # the reward model ranks held-out pairs well above chance, and its loss fell
    metrics = manifest["rm"]["metrics"]
    assert metrics["eval_accuracy"] > 0.7, metrics
    assert metrics["eval_loss"] < 0.5, metrics  # log 2 = 0.69 at chance
    log = [json.loads(x) for x in (cfg.run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r.get("kind") == "train"]
    assert train[-1]["loss"] < train[0]["loss"], train

    # WARM: the merged head (and every weight) is the mean of the members'
    ctx = StageContext(
        pipeline=cfg, name="t", manifest=Manifest(cfg.run_dir / "manifest.json"), stop=None
    )
    a, b, warm = (np_tree(ctx.trained_params(s)[1]) for s in ("rm_a", "rm_b", "rm_warm"))
    assert not np.allclose(a["score_head"]["kernel"], b["score_head"]["kernel"])  # seeds differ
    for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(warm), strict=True):
        np.testing.assert_allclose(m, (x + y) / 2, rtol=1e-6, atol=1e-6)

    # the scorer: float32 [n], independent of padding, ranks right answers over wrong ones
    tok = ctx.tokenizer()
    examples = [{"prompt": f"What is {i} + {i % 5}?"} for i in range(10)]
    right = [str(i + i % 5) for i in range(10)]
    wrong = [str(i + i % 5 + 25) for i in range(10)]
    score = rm.make_scorer(ctx=ctx, stage="rm", tokenizer=tok, seq_len=32, batch_size=8)
    s_right = score(examples=examples, completions=right)
    s_wrong = score(examples=examples, completions=wrong)
    assert s_right.dtype == np.float32 and s_right.shape == (10,)
    assert (s_right > s_wrong).mean() >= 0.8, (s_right, s_wrong)
    np.testing.assert_allclose(
        score(examples=examples[:3], completions=right[:3]), s_right[:3], rtol=1e-5, atol=1e-5
    )
    warm_score = rm.make_scorer(ctx=ctx, stage="rm_warm", tokenizer=tok, seq_len=32, batch_size=8)
    out = warm_score(examples=examples, completions=right)
    assert out.shape == (10,) and np.isfinite(out).all()

    from data.rewards import compute_rewards

    total, parts = compute_rewards(
        specs={"reward_model": 1.0},
        examples=examples,
        completions=right,
        extra={"reward_model": score},
    )
    np.testing.assert_allclose(total, s_right, rtol=1e-6)
