"""On-policy distillation (recipes/onpolicy_distill.py): the loss against a float64 reference
for each divergence, the deterministic on-policy/dataset choice, the vocabulary check, and a
tiny teacher -> on-policy student pipeline whose KL to the teacher falls."""

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import launch
from recipes.onpolicy_distill import Config, is_on_policy, make_loss
from tests.conftest import write_kjv_corpus
from tests.test_resume import launch as launch_process
from tests.test_resume import wait_for_checkpoint
from train.metrics import read_metrics
from train.models.config import ModelConfig
from train.models.gemma import Transformer
from train.rollout import sequence_batch

TINY = dict(
    family="gemma3",
    vocab_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    layer_pattern=("local", "global"),
    sliding_window=4,
    scan_layers=False,
)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_divergence(s, t, mask, *, divergence, beta, temperature):
    """float64 numpy: sum over masked positions of the divergence between p = softmax(t / T)
    (teacher) and q = softmax(s / T) (student), times T^2."""
    ls, lt = _log_softmax(s / temperature), _log_softmax(t / temperature)
    q, p = np.exp(ls), np.exp(lt)
    kl = lambda a, la, lb: (a * (la - lb)).sum(-1)
    if divergence == "forward":
        d = kl(p, lt, ls)
    elif divergence == "reverse":
        d = kl(q, ls, lt)
    else:
        lm = np.log(beta * p + (1 - beta) * q)
        d = beta * kl(p, lt, lm) + (1 - beta) * kl(q, ls, lm)
    return (d * mask).sum() * temperature**2, (kl(p, lt, ls) * mask).sum()


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_loss_is_the_divergence_on_response_tokens(divergence):
    student = Transformer(ModelConfig(**TINY, d_model=16, ffw_dim=32), rngs=nnx.Rngs(1))
    teacher = Transformer(ModelConfig(**TINY, d_model=32, ffw_dim=64), rngs=nnx.Rngs(2))
    t_graphdef, t_params = nnx.split(teacher, nnx.Param)
    prompts = [[2, 5, 6, 7], [2, 9, 10], [2, 11, 12, 13, 14]]
    tokens = np.array([[20, 21, 1, 0], [30, 31, 32, 33], [40, 0, 0, 0]], np.int32)
    lengths = np.array([3, 4, 1], np.int32)
    batch = sequence_batch(prompts, tokens, lengths, width=10, pad_id=0)
    cfg = Config(
        kind="onpolicy_distill", model="s", teacher="t", divergence=divergence, beta=0.3,
        temperature=2.0,
    )  # fmt: skip
    loss_fn = make_loss(cfg, teacher_graphdef=t_graphdef)
    jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    loss_sum, sums = loss_fn(student, jb, jax.random.key(0), t_params)

    kw = dict(positions=jb["positions"], segment_ids=jb["segment_ids"])
    s = np.asarray(student(jb["inputs"], **kw), np.float64)
    t = np.asarray(teacher(jb["inputs"], **kw), np.float64)
    mask = batch["loss_mask"].astype(np.float64)
    assert mask.sum() == lengths.sum()  # the response tokens (stop token included), no prompt
    want, want_kl = reference_divergence(
        s, t, mask, divergence=divergence, beta=0.3, temperature=2.0
    )
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["kl_to_teacher"]), want_kl, rtol=1e-5, atol=1e-6)
    assert float(sums["tokens"]) == lengths.sum()


def test_on_policy_choice_is_a_function_of_seed_and_step():
    a = [is_on_policy(seed=3, step=s, fraction=0.5) for s in range(1, 201)]
    b = [is_on_policy(seed=3, step=s, fraction=0.5) for s in range(1, 201)]
    assert a == b and 70 < sum(a) < 130
    assert a != [is_on_policy(seed=4, step=s, fraction=0.5) for s in range(1, 201)]
    assert all(is_on_policy(seed=0, step=s, fraction=1.0) for s in range(1, 50))
    assert not any(is_on_policy(seed=0, step=s, fraction=0.0) for s in range(1, 50))


# ---------------------------------------------------------------------------------------------
# a tiny pipeline: an SFT teacher, a smaller random student distilled on its own samples


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_kjv_corpus(tmp_path_factory.mktemp("onpolicy"), 20)


def pipeline(workdir: Path, name: str, **changes) -> Path:
    corpus = {"text": str(workdir / "corpus.txt")}
    tiny = {
        "preset": "gemma3-tiny",
        "num_layers": 2,
        "layer_pattern": ["local", "global"],
        "sliding_window": 8,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 16,
    }
    task = {
        "name": "arithmetic",
        "options": {"max_value": 9, "ops": "+"},
        "train_size": 400,
        "test_size": 16,
    }
    cfg = {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 2},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {
            "teacher": {**tiny, "d_model": 64, "ffw_dim": 128},
            "student": {**tiny, "d_model": 32, "ffw_dim": 64},
        },
        "stages": {
            "teacher": {
                "kind": "sft",
                "model": "teacher",
                "task": task,
                "data": {"seq_len": 64, "batch_size": 16},
                "optim": {"lr": 3e-3, "warmup_steps": 5},
                "steps": 30,
                "eval": {"batches": 1},
                "rewards": {},
            },
            "onpolicy": {
                "kind": "onpolicy_distill",
                "model": "student",
                "teacher": "teacher",
                "task": task,
                "rollout": {
                    "prompts_per_step": 16,
                    "samples_per_prompt": 1,
                    "max_new_tokens": 6,
                    "max_prompt_len": 32,
                },
                "divergence": "reverse",
                "on_policy_fraction": 0.5,
                "optim": {"lr": 3e-3, "warmup_steps": 0},
                "steps": 10,
                "eval": {"every": 2, "batches": 1},
                "checkpoint": {"every": 2, "keep": 2},
            },
        },
    }
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_teacher_vocab_must_match_the_student(workdir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = launch.main([str(pipeline(workdir, "vocab", **{"models.student.vocab_size": 320}))])
    err = capsys.readouterr().err
    assert rc == 2 and "stages.onpolicy.model: the student's vocab_size 320 differs" in err, err


@pytest.fixture(scope="module")
def tiny_run(workdir):
    rc, out = launch_process(pipeline(workdir, "tiny"))
    assert rc == 0, out
    return workdir / "runs/tiny"


@pytest.mark.slow
def test_onpolicy_student_moves_toward_the_teacher(tiny_run):
    run_dir = tiny_run
    records = read_metrics(run_dir / "onpolicy/metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 5 and len(evals) == 5
    assert 0.0 < np.mean([r["on_policy"] for r in train]) < 1.0  # both kinds of step ran
    assert all(0 < r["response_len"] <= 6 for r in train)
    assert evals[-1]["kl_to_teacher"] < 0.8 * evals[0]["kl_to_teacher"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "accuracy" in evals[-1]
    st = json.loads((run_dir / "manifest.json").read_text())["stages"]["onpolicy"]
    assert st["status"] == "done" and st["metrics"]["kl_to_teacher"] > 0


@pytest.mark.slow
def test_killed_onpolicy_stage_resumes_exactly(workdir, tiny_run):
    """SIGKILL after an on-policy checkpoint, run again: the same params_sha256 as the run
    never interrupted (rollouts and the on-policy choice are functions of (seed, step))."""
    config = pipeline(workdir, "killed")
    run_dir = workdir / "runs/killed"
    proc = launch_process(config, wait=False)
    wait_for_checkpoint(run_dir, proc, at_least=2, stage="onpolicy")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["onpolicy"]
    assert entry["status"] != "done"  # killed mid-stage
    rc, out = launch_process(config)
    assert rc == 0, out
    assert "onpolicy (onpolicy_distill): resume" in out, out
    got = json.loads((run_dir / "manifest.json").read_text())["stages"]["onpolicy"]
    ref = json.loads((tiny_run / "manifest.json").read_text())["stages"]["onpolicy"]
    assert got["params_sha256"] == ref["params_sha256"]
