"""Sweeps (train/sweep.py): trial expansion, validation, shared stages, resume, optuna.

The slow tests run a tiny two-stage pipeline (a `teacher` pretrain that every trial shares and
a `student` initialised from it, swept over its optimizer) through launch.py in real processes:
a 4-trial grid, the same grid killed with SIGKILL in its second trial and resumed, and a
6-trial optuna sweep with SQLite storage killed and resumed.
"""

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_kjv_corpus
from train.config import ConfigError
from train.sweep import Sweep, expand_grid, expand_random, run_sweep

ROOT = Path(__file__).resolve().parent.parent

MODEL = {
    "preset": "gemma3-tiny",
    "num_layers": 2,
    "d_model": 32,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
    "ffw_dim": 64,
    "sliding_window": 8,
    "layer_pattern": ["local", "global"],
}

GRID = {
    "method": "grid",
    "params": {
        "stages.student.optim.lr": [1e-3, 3e-3],
        "stages.student.optim.weight_decay": [0.0, 0.1],
    },
    "metric": "stages.student.metrics.eval_loss",
    "goal": "minimize",
}


def pipeline(workdir: Path, name: str, sweep: dict) -> dict:
    corpus = {"text": str(workdir / "corpus.txt")}
    data = {"corpus": corpus, "seq_len": 32, "batch_size": 8}
    return {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 4},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {"m": MODEL},
        "stages": {
            "teacher": {
                "kind": "pretrain",
                "model": "m",
                "data": data,
                "optim": {"lr": 3e-3, "warmup_steps": 2},
                "steps": 12,
                "eval": {"every": 0, "batches": 2},
                "checkpoint": {"every": 6, "keep": 1},
            },
            "student": {
                "kind": "pretrain",
                "model": "m",
                "init": {"stage": "teacher"},
                "data": data,
                "optim": {"lr": 1e-3, "warmup_steps": 2},
                "steps": 12,
                "eval": {"every": 4, "batches": 2},
                "checkpoint": {"every": 4, "keep": 2},
            },
        },
        "sweep": sweep,
    }


def write_sweep(workdir: Path, name: str, sweep: dict) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipeline(workdir, name, sweep), sort_keys=False))
    return path


def launch(config: Path, *args, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_NUM_CPU_DEVICES": "1"}
    log = open(config.with_suffix(f".{time.time_ns()}.log"), "w")  # a file: a pipe could fill
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), str(config), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_path = Path(log.name)
    if wait:
        proc.wait(timeout=600)
        log.close()
        return proc.returncode, proc.log_path.read_text()
    return proc


def kill_when_checkpointed(proc, run_dir: Path, stage: str = "student", timeout: float = 300):
    """SIGKILL `proc` once the manifest in `run_dir` records a checkpoint of `stage`."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            step = manifest(run_dir)["stages"].get(stage, {}).get("step")
        except (FileNotFoundError, json.JSONDecodeError):
            step = None
        if step and manifest(run_dir)["stages"][stage]["status"] == "running":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, proc.log_path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {stage} recorded in {run_dir}")


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def summary(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader((sweep_dir / "summary.csv").open()))


# ---------------------------------------------------------------------------------------------
# expansion and validation (fast)


@pytest.fixture
def raw(tmp_path):
    (tmp_path / "corpus.txt").write_text("in the beginning " * 50)
    return pipeline(tmp_path, "s", copy.deepcopy(GRID))


def test_grid_is_the_product_in_yaml_order(raw):
    raw["sweep"]["params"]["stages.student.steps"] = [5, 6, 7]
    sweep = Sweep(raw, source="s.yaml", num_devices=1)
    trials = expand_grid(sweep.spec)
    assert len(trials) == 12
    assert trials[0] == {
        "stages.student.optim.lr": 1e-3,
        "stages.student.optim.weight_decay": 0.0,
        "stages.student.steps": 5,
    }
    assert [t["stages.student.steps"] for t in trials[:4]] == [5, 6, 7, 5]  # last key fastest
    assert [t["stages.student.optim.lr"] for t in trials] == [1e-3] * 6 + [3e-3] * 6


def test_random_draws_are_seeded(raw):
    raw["sweep"] = {
        "method": "random",
        "trials": 5,
        "seed": 3,
        "metric": "stages.student.metrics.eval_loss",
        "params": {
            "stages.student.optim.lr": {"loguniform": [1e-4, 1e-2]},
            "stages.student.optim.warmup_steps": {"int": [0, 4]},
            "stages.student.optim.schedule": {"choice": ["cosine", "constant"]},
            "stages.student.optim.b1": {"uniform": [0.8, 0.95]},
        },
    }
    a = expand_random(Sweep(raw, source="s.yaml", num_devices=1).spec)
    b = expand_random(Sweep(raw, source="s.yaml", num_devices=1).spec)
    assert a == b and len(a) == 5 and len({t["stages.student.optim.lr"] for t in a}) == 5
    for t in a:
        assert 1e-4 <= t["stages.student.optim.lr"] <= 1e-2
        assert t["stages.student.optim.warmup_steps"] in range(5)
        assert 0.8 <= t["stages.student.optim.b1"] <= 0.95
    raw["sweep"]["seed"] = 4
    assert expand_random(Sweep(raw, source="s.yaml", num_devices=1).spec) != a


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("stages.student.optim.lrr", [1e-3], "stages.student.optim.lrr: unknown key"),
        ("stages.nope.optim.lr", [1e-3], "sweep.params.stages.nope.optim.lr: unknown stage"),
        ("stages.student.optim.lr", [-1.0], "stages.student.optim.lr: Input should be greater"),
        ("stages.student.optim.lr", {"uniform": [1, 2]}, "uniform is a range; grid needs a list"),
        ("stages.student.optim.lr", {"gauss": [1, 2]}, "unknown spec 'gauss'"),
    ],
)
def test_bad_params_are_config_errors_naming_the_key(raw, tmp_path, key, value, expect):
    raw["sweep"]["params"][key] = value
    with pytest.raises(ConfigError) as e:
        run_sweep(raw, source="s.yaml", dry_run=True, num_devices=1, log=lambda *_: None)
    assert any(expect in m for m in e.value.messages), e.value.messages
    assert not (tmp_path / "runs").exists()  # nothing written


def test_every_trial_is_validated_before_any_runs(raw, tmp_path):
    raw["sweep"]["params"]["stages.student.data.batch_size"] = [8, 0]  # the second is invalid
    with pytest.raises(ConfigError) as e:
        run_sweep(raw, source="s.yaml", num_devices=1, log=lambda *_: None)
    assert any("trial t001" in m and "data.batch_size" in m for m in e.value.messages)
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_trials_and_shared_stages(raw):
    lines = []
    assert run_sweep(raw, source="s.yaml", dry_run=True, num_devices=1, log=lines.append) == 0
    text = "\n".join(lines)
    assert "shared stages" in text and "teacher" in text.split("shared stages")[1].split("\n")[0]
    assert all(f"t00{i}" in text for i in range(4))


def test_optuna_finds_shared_stages_by_moving_the_params(raw):
    from train.sweep import _optuna_corners

    raw["sweep"] = {**GRID, "method": "optuna", "trials": 3}
    raw["sweep"]["params"] = {"stages.student.optim.lr": {"loguniform": [1e-4, 1e-2]}}
    sweep = Sweep(raw, source="s.yaml", num_devices=1)
    assert sweep.shared_stages(_optuna_corners(sweep)) == ["teacher"]
    raw["sweep"]["params"] = {"stages.teacher.steps": {"int": [4, 8]}}
    sweep = Sweep(raw, source="s.yaml", num_devices=1)
    assert sweep.shared_stages(_optuna_corners(sweep)) == []  # the student reads the teacher


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_sweeps_validate(path):
    from train.config import read_yaml

    lines = []
    assert run_sweep(read_yaml(path), source=str(path), dry_run=True, log=lines.append) == 0
    assert "shared stages" in "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# end to end (slow)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_kjv_corpus(tmp_path_factory.mktemp("sweep"), 40)


@pytest.fixture(scope="module")
def grid_sweep(workdir):
    rc, out = launch(write_sweep(workdir, "grid", GRID))
    assert rc == 0, out
    return workdir / "runs/grid", out


@pytest.mark.slow
def test_grid_sweep_runs_the_shared_teacher_once(grid_sweep):
    sweep_dir, out = grid_sweep
    assert out.count("== stage teacher") == 1
    assert (sweep_dir / "shared/teacher/metrics.jsonl").exists()
    assert not list(sweep_dir.glob("trials/*/teacher"))  # no trial trained or logged a teacher
    shared = manifest(sweep_dir / "shared")["stages"]["teacher"]
    rows = summary(sweep_dir)
    assert [r["trial"] for r in rows] != [] and len(rows) == 4
    for tid in ("t000", "t001", "t002", "t003"):
        m = manifest(sweep_dir / "trials" / tid)["stages"]
        assert m["teacher"]["final_checkpoint"] == shared["final_checkpoint"]
        assert m["teacher"]["params_sha256"] == shared["params_sha256"]
        assert m["student"]["status"] == "done"
        params = json.loads((sweep_dir / "trials" / tid / "trial.json").read_text())["params"]
        assert set(params) == set(GRID["params"])
    # sorted by the metric, best (lowest) first; the trials differ
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert {r["status"] for r in rows} == {"done"}
    assert (sweep_dir / "summary.md").exists()
    assert (sweep_dir / "sweep_stages.student.optim.lr.png").exists()
    # rerunning a finished sweep does nothing
    rc, out2 = launch(sweep_dir.parent.parent / "grid.yaml")
    assert rc == 0 and "== stage" not in out2 and out2.count("done, skipped") == 4


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(workdir, grid_sweep):
    sweep_dir = workdir / "runs/killed"
    config = write_sweep(workdir, "killed", GRID)
    proc = launch(config, wait=False)
    kill_when_checkpointed(proc, sweep_dir / "trials/t001")
    first = manifest(sweep_dir / "trials/t000")["stages"]["student"]
    assert first["status"] == "done"
    assert manifest(sweep_dir / "trials/t001")["stages"]["student"]["status"] == "running"
    rc, out = launch(config)
    assert rc == 0, out
    assert "trial t000: done, skipped" in out and "== stage teacher" not in out
    assert manifest(sweep_dir / "trials/t000")["stages"]["student"]["finished"] == first["finished"]
    assert "resume" in out.split("=== trial t001")[1].split("=== trial t002")[0]
    # the same summary (metric values and final parameters) as the uninterrupted sweep
    ref = (grid_sweep[0] / "summary.csv").read_text()
    assert (sweep_dir / "summary.csv").read_text() == ref


@pytest.mark.slow
def test_optuna_sweep_with_sqlite_storage_resumes(workdir):
    import optuna

    spec = {
        "method": "optuna",
        "params": {"stages.student.optim.lr": {"loguniform": [1e-4, 1e-2]}},
        "trials": 6,
        "metric": "stages.student.metrics.eval_loss",
        "goal": "minimize",
        "seed": 0,
    }
    sweep_dir = workdir / "runs/opt"
    config = write_sweep(workdir, "opt", spec)
    proc = launch(config, wait=False)
    kill_when_checkpointed(proc, sweep_dir / "trials/t001")
    first = manifest(sweep_dir / "trials/t000")["stages"]["student"]
    params_t001 = json.loads((sweep_dir / "trials/t001/trial.json").read_text())["params"]
    rc, out = launch(config)
    assert rc == 0, out
    assert "== stage teacher" not in out
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{sweep_dir}/optuna.db")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 and len(states) == 6
    assert len({t.params["stages.student.optim.lr"] for t in study.trials}) == 6  # no replays
    t1 = study.trials[1]
    assert t1.params == params_t001  # the interrupted trial resumed with its own params
    assert (
        t1.value == manifest(sweep_dir / "trials/t001")["stages"]["student"]["metrics"]["eval_loss"]
    )
    assert manifest(sweep_dir / "trials/t000")["stages"]["student"]["finished"] == first["finished"]
    rows = summary(sweep_dir)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert float(rows[0]["eval_loss"]) == study.best_value


def test_median_pruner_stops_a_trial_from_its_logged_evals(tmp_path):
    """The hook that `pruner: median` installs: each eval the metric's stage logs is reported
    to optuna, and a trial worse than the median of earlier trials at that step is stopped."""
    import optuna

    from train.metrics import EVAL_HOOKS, LoggingConfig, MetricsLogger
    from train.sweep import SweepConfig, _pruning

    spec = SweepConfig(
        method="optuna",
        params={"stages.student.optim.lr": {"loguniform": [1e-4, 1e-2]}},
        trials=2,
        metric="stages.student.metrics.eval_loss",
        pruner="median",
    )
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(1.0, 4)
    study.tell(first, 1.0)
    logger = lambda stage: MetricsLogger(
        stage_dir=tmp_path / stage,
        run_dir=tmp_path,
        run_name="t",
        stage_name=stage,
        cfg=LoggingConfig(wandb="disabled", progress=False),
        config={},
        total_steps=12,
    )
    second = study.ask()
    with _pruning(study, second, spec, last_step=12) as pruned:
        logger("teacher").log(4, {"eval_loss": 9.0}, kind="eval")  # another stage: ignored
        logger("student").log(4, {"eval_loss": 0.5}, kind="eval")  # better than the median
    assert pruned == [] and study.trials[1].intermediate_values == {4: 0.5}
    third = study.ask()
    with _pruning(study, third, spec, last_step=12) as pruned:
        with pytest.raises(optuna.TrialPruned):
            logger("student").log(4, {"eval_loss": 3.0}, kind="eval")  # worse: pruned
        logger("student").log(12, {"eval_loss": 3.0}, kind="eval")  # the final eval: kept
    assert pruned == [4] and EVAL_HOOKS == []
