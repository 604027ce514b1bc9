"""The resume contract, end to end through launch.py in real processes.

A pretrain stage killed with SIGKILL at random moments and restarted with the same command
ends with the same params_sha256 as a run never interrupted; SIGTERM saves and exits 0; a
corrupt latest checkpoint falls back to the previous one; a changed config is refused; the
same run on a 2x2x2 mesh of 8 CPU devices follows the 1-device loss curve.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_kjv_corpus
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_kjv_corpus(tmp_path_factory.mktemp("resume"), 60)


def write_config(workdir: Path, name: str, extra_stages=None, **stage) -> Path:
    corpus = {"text": str(workdir / "corpus.txt")}
    cfg = {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 5},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {
            "m": {
                "preset": "gemma3-tiny",
                "num_layers": 3,
                "d_model": 32,
                "num_heads": 2,
                "num_kv_heads": 1,
                "head_dim": 16,
                "ffw_dim": 64,
                "sliding_window": 8,
                "layer_pattern": ["local", "local", "global"],
            },
        },
        "stages": {
            "a": {
                "kind": "pretrain",
                "model": "m",
                "data": {"corpus": corpus, "seq_len": 32, "batch_size": 8},
                "optim": {"lr": 3e-3, "warmup_steps": 5},
                "steps": 60,
                "eval": {"every": 30, "batches": 2},
                "checkpoint": {"every": 4, "keep": 2},
                **stage,
            }
        },
    }
    cfg["stages"].update(extra_stages or {})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *args, devices: int = 1, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_NUM_CPU_DEVICES": str(devices)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out
    return proc


def manifest(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "runs" / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference(workdir):
    start = time.time()
    rc, out = launch(write_config(workdir, "ref"))
    assert rc == 0, out
    entry = manifest(workdir, "ref")["stages"]["a"]
    assert entry["status"] == "done" and entry["step"] == 60
    return entry["params_sha256"], time.time() - start


def test_sigkill_at_random_moments_then_resume_gives_identical_params(workdir, reference):
    ref_hash, _ = reference
    config = write_config(workdir, "killed")
    run_dir = workdir / "runs/killed"
    rng = random.Random(1234)
    # one kill during start-up (tokenizer, compile), then kills at random moments of training:
    # between steps, inside a step, during an async checkpoint write
    proc = launch(config, wait=False)
    time.sleep(rng.uniform(1.0, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = 0
    for _ in range(3):
        proc = launch(config, wait=False)
        wait_for_checkpoint(run_dir, proc, at_least=seen + 4)
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = max(int(p.name) for p in (run_dir / "a/checkpoints").glob("*") if p.name.isdigit())
    assert seen < 60
    rc, out = launch(config)
    assert rc == 0, out
    entry = manifest(workdir, "killed")["stages"]["a"]
    assert entry["status"] == "done"
    assert entry["params_sha256"] == ref_hash
    # the resumed metrics file holds each logged train step once
    records = read_metrics(run_dir / "a/metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(5, 61, 5))


def wait_for_checkpoint(
    run_dir: Path, proc, at_least: int = 8, timeout: float = 300, stage: str = "a"
):
    ckpts = run_dir / stage / "checkpoints"
    end = time.time() + timeout
    while time.time() < end:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= at_least:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigterm_saves_and_exits_cleanly_then_resumes(workdir, reference):
    config = write_config(workdir, "term")
    proc = launch(config, wait=False)
    wait_for_checkpoint(workdir / "runs/term", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    entry = manifest(workdir, "term")["stages"]["a"]
    assert entry["status"] == "running" and 8 <= entry["step"] < 60
    rc, out = launch(config)
    assert rc == 0, out
    assert manifest(workdir, "term")["stages"]["a"]["params_sha256"] == reference[0]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(workdir, reference):
    config = write_config(workdir, "corrupt")
    proc = launch(config, wait=False)
    wait_for_checkpoint(workdir / "runs/corrupt", proc, at_least=12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = workdir / "runs/corrupt/a/checkpoints"
    steps = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert len(steps) >= 2
    latest = ckpts / str(steps[-1])
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"")  # truncate everything in the newest step
    rc, out = launch(config)
    assert rc == 0, out
    assert f"checkpoint step {steps[-1]}" in out and "does not restore" in out
    assert manifest(workdir, "corrupt")["stages"]["a"]["params_sha256"] == reference[0]


def test_changed_config_is_refused_unless_fresh(workdir, reference):
    config = write_config(workdir, "ref", steps=61)
    rc, out = launch(config)
    assert rc == 2
    assert "holds results of a different config for stage(s) a" in out and "--fresh" in out
    assert manifest(workdir, "ref")["stages"]["a"]["step"] == 60  # untouched
    rc, out = launch(write_config(workdir, "ref"))  # the original config: nothing to do
    assert rc == 0 and "| a     | pretrain | skip" in out


def test_a_new_stage_skips_done_ones_and_starts_from_an_artifact(workdir, reference):
    corpus = {"text": str(workdir / "corpus.txt")}
    b = {
        "kind": "pretrain",
        "model": "m",
        "init": {"stage": "a"},
        "steps": 5,
        "data": {"corpus": corpus, "seq_len": 32, "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "eval": {"batches": 2},
    }
    rc, out = launch(write_config(workdir, "ref", extra_stages={"b": b}))
    assert rc == 0, out
    assert "| a     | pretrain | skip" in out and "| b     | pretrain | run" in out
    stages = manifest(workdir, "ref")["stages"]
    assert stages["a"]["params_sha256"] == reference[0] and stages["b"]["status"] == "done"
    first_b = read_metrics(workdir / "runs/ref/b/metrics.jsonl")[0]
    last_a = [r for r in read_metrics(workdir / "runs/ref/a/metrics.jsonl") if r["kind"] == "train"]
    assert first_b["loss"] < last_a[0]["loss"]  # b starts where a ended, not from scratch


def test_fsdp_tensor_mesh_follows_the_single_device_loss_curve(workdir, reference):
    rc, out = launch(
        write_config(workdir, "mesh8"), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8
    )
    assert rc == 0, out
    curve = lambda name: [
        r["loss"]
        for r in read_metrics(workdir / "runs" / name / "a/metrics.jsonl")
        if r["kind"] == "train"
    ]
    one, eight = curve("ref"), curve("mesh8")
    assert len(one) == len(eight) == 12
    for a, b in zip(one, eight, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, eight)
