"""Post-training stages end to end: rollout batches; sft -> rl (GRPO with an EMA KL anchor and
two updates per rollout), rl (J-BOND), sft on a teacher's responses, a reward model used as an
RL reward, a WARP merge (SLERP + LITI); and exact resume after SIGKILL in the middle of sft, GRPO
and J-BOND (the sampler's key and the EMA anchor included)."""

import random
import signal
import time

import numpy as np
import pytest

from tests.conftest import write_kjv_corpus
from tests.test_resume import launch, manifest, wait_for_checkpoint, write_config
from train.rollout import sequence_batch, step_examples


def test_sequence_batch_masks_the_response_and_aligns_logprobs():
    prompts = [[2, 10, 11], [2, 12]]
    tokens = np.array([[20, 21, 5, 0], [22, 5, 0, 0]], np.int32)
    lengths = np.array([3, 2])
    logprobs = np.array([[-0.1, -0.2, -0.3, 0], [-0.4, -0.5, 0, 0]], np.float32)
    b = sequence_batch(prompts, tokens, lengths, width=8, pad_id=0, logprobs=logprobs)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        on = b["loss_mask"][i] > 0
        assert b["targets"][i][on].tolist() == tokens[i, :n].tolist()
        assert np.allclose(b["old_logprobs"][i][on], logprobs[i, :n])
        assert b["inputs"][i, : len(p)].tolist() == p
        real = b["segment_ids"][i] > 0
        assert real.sum() == len(p) + n - 1  # the last token is only a target
        assert b["positions"][i][real].tolist() == list(range(len(p) + n - 1))
    assert b["loss_mask"].sum() == lengths.sum()


def test_step_examples_are_a_pure_function_of_the_step():
    ex = [{"id": str(i)} for i in range(10)]
    a = [e["id"] for s in range(1, 6) for e in step_examples(ex, step=s, count=4, seed=3)]
    b = [e["id"] for s in range(1, 6) for e in step_examples(ex, step=s, count=4, seed=3)]
    assert a == b
    assert sorted(a[:10]) == sorted(e["id"] for e in ex)  # an epoch covers every example once
    assert a != [e["id"] for s in range(1, 6) for e in step_examples(ex, step=s, count=4, seed=4)]


TASK = {"name": "arithmetic", "options": {"max_value": 9, "ops": "+"}, "train_size": 64}
ROLLOUT = {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4}


def posttrain_stages(steps: int = 6) -> dict:
    rl = {
        "model": "m",
        "task": {**TASK, "test_size": 8},
        "rollout": {**ROLLOUT, "max_prompt_len": 40},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "steps": steps,
        "eval": {"every": 0},
        "checkpoint": {"every": 2, "keep": 2},
    }
    return {
        "sft": {
            "kind": "sft",
            "model": "m",
            "init": {"stage": "a"},
            "task": {**TASK, "test_size": 8},
            "data": {"seq_len": 48, "batch_size": 8},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "rollout": {**ROLLOUT, "max_prompt_len": 40},
            "steps": 6,
            "eval": {"every": 0, "batches": 1},
            "checkpoint": {"every": 2, "keep": 2},
        },
        "grpo": {
            **rl,
            "kind": "rl",
            "init": {"stage": "sft"},
            "algorithm": "grpo",
            "updates_per_rollout": 2,
            "kl": {"coef": 0.1, "anchor": "ema", "ema_decay": 0.9},
        },
        "bond": {
            **rl,
            "kind": "rl",
            "init": {"stage": "sft"},
            "algorithm": "bond",
            "rollout": {**rl["rollout"], "samples_per_prompt": 1, "prompts_per_step": 8},
        },
        # sequence-level distillation: the responses are stage a's greedy answers
        "sft_kd": {
            "kind": "sft",
            "model": "m",
            "init": {"stage": "a"},
            "teacher": "a",
            "task": {**TASK, "test_size": 8},
            "data": {"seq_len": 48, "batch_size": 8},
            "rollout": {**ROLLOUT, "max_prompt_len": 40},
            "steps": 2,
            "rewards": {},
        },
        "rm": {
            "kind": "reward_model",
            "model": "m",
            "init": {"stage": "sft"},
            "task": {**TASK, "test_size": 8},
            "data": {"seq_len": 48, "batch_size": 8},
            "steps": 4,
            "eval": {"every": 0, "batches": 1},
            "checkpoint": {"every": 2, "keep": 2},
        },
        "rl_rm": {
            **rl,
            "kind": "rl",
            "init": {"stage": "sft"},
            "rewards": {"math_exact": 1.0, "reward_model": 0.5},
            "reward_model": "rm",
            "steps": 2,
        },
        "warp": {
            "kind": "merge",
            "model": "m",
            "sources": ["grpo", "bond"],
            "method": "slerp",
            "base": "sft",
            "liti": 0.5,
        },
    }


@pytest.mark.slow
def test_posttraining_resumes_exactly_after_sigkill(tmp_path):
    write_kjv_corpus(tmp_path, 60)
    stages = posttrain_stages()
    ref_cfg = write_config(tmp_path, "post_ref", extra_stages=stages, steps=10)
    rc, out = launch(ref_cfg)
    assert rc == 0, out[-3000:]
    ref = manifest(tmp_path, "post_ref")["stages"]
    for name in ("sft", "grpo", "bond", "rl_rm"):
        assert ref[name]["status"] == "done", name
        m = ref[name]["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0
    for name in ("sft_kd", "rm", "warp"):
        assert ref[name]["status"] == "done", name
    assert "accuracy_init" in ref["grpo"]["metrics"]
    rows = (tmp_path / "runs/post_ref/grpo/metrics.jsonl").read_text()
    assert '"kind": "table"' in rows and "reward_mean" in rows

    config = write_config(tmp_path, "post_killed", extra_stages=stages, steps=10)
    run_dir = tmp_path / "runs/post_killed"
    rng = random.Random(7)
    for stage in ("sft", "grpo", "bond"):
        proc = launch(config, wait=False)
        wait_for_checkpoint(run_dir, proc, at_least=2, stage=stage, timeout=300)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    rc, out = launch(config)
    assert rc == 0, out[-3000:]
    got = manifest(tmp_path, "post_killed")["stages"]
    for name in ("a", "sft", "grpo", "bond", "sft_kd", "rm", "rl_rm", "warp"):
        assert got[name]["params_sha256"] == ref[name]["params_sha256"], name
