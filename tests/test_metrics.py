"""train/metrics.py: JSONL records, resume truncation, wandb modes, NaN guard, throughput."""

import json
import logging
import math

import pytest

from train.metrics import (
    LoggingConfig,
    MetricsLogger,
    NonFiniteError,
    Throughput,
    check_finite,
    read_metrics,
)


def _logger(tmp_path, start_step=0, **cfg):
    cfg = LoggingConfig(**{"wandb": "disabled", "progress": False, **cfg})
    return MetricsLogger(
        stage_dir=tmp_path / "run" / "student",
        run_dir=tmp_path / "run",
        run_name="run",
        stage_name="student",
        cfg=cfg,
        config={"lr": 1e-3},
        total_steps=20,
        start_step=start_step,
    )


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        LoggingConfig(wandb="offline", evry=5)
    assert LoggingConfig().wandb == "offline"


def test_one_line_per_log_call(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-3})
        logger.log(1, {"eval_loss": 3.0}, kind="eval")
        logger.log(2, {"loss": float("nan"), "note": "x"})
        # Flushed per line: readable before close.
        assert len(read_metrics(logger.path)) == 3
    lines = logger.path.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line) for line in lines] == read_metrics(logger.path)
    records = _strip_time(read_metrics(logger.path))
    assert records == [
        {"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-3},
        {"step": 1, "kind": "eval", "eval_loss": 3.0},
        {"step": 2, "kind": "train", "loss": None, "note": "x"},  # nan -> null: strict JSON
    ]
    assert list(json.loads(lines[0]))[-1] == "time"


def test_resume_drops_steps_after_checkpoint(tmp_path):
    def log_steps(logger, steps):
        for s in steps:
            logger.log(s, {"loss": 1.0 / s})
            if s % 5 == 0:
                logger.log(s, {"eval_loss": 2.0 / s}, kind="eval")

    with _logger(tmp_path / "a") as logger:
        log_steps(logger, range(1, 11))
    with _logger(tmp_path / "a", start_step=6) as logger:
        assert {r["step"] for r in read_metrics(logger.path)} == set(range(1, 7))
        log_steps(logger, range(7, 13))
    with _logger(tmp_path / "b") as logger:  # never interrupted
        log_steps(logger, range(1, 13))
    straight = read_metrics(logger.path)
    resumed = read_metrics(tmp_path / "a" / "run" / "student" / "metrics.jsonl")
    assert _strip_time(resumed) == _strip_time(straight)
    assert [r["step"] for r in straight if r["kind"] == "train"] == list(range(1, 13))


def test_fresh_start_empties_file(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(0, {"eval_loss": 1.0}, kind="eval")
        logger.log(1, {"loss": 1.0})
    with _logger(tmp_path) as logger:
        logger.log(0, {"eval_loss": 1.0}, kind="eval")
    assert [r["step"] for r in read_metrics(logger.path)] == [0]


def test_truncated_last_line_tolerated(tmp_path, caplog):
    with _logger(tmp_path) as logger:
        for s in range(1, 4):
            logger.log(s, {"loss": 1.0})
    with open(logger.path, "a") as f:
        f.write('{"step": 4, "kind": "tra')  # killed mid-write
    assert [r["step"] for r in read_metrics(logger.path)] == [1, 2, 3]
    with caplog.at_level(logging.WARNING), _logger(tmp_path, start_step=3) as logger:
        logger.log(4, {"loss": 0.5})
    assert "truncated" in caplog.text
    assert [r["step"] for r in read_metrics(logger.path)] == [1, 2, 3, 4]
    assert not logger.path.with_suffix(".jsonl.tmp").exists()


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_log_table_and_console_line(tmp_path, capsys):
    with _logger(tmp_path, progress=True) as logger:  # stderr is not a TTY under pytest
        logger.log_table("samples", ["prompt", "completion"], [["In the", "beginning"]], step=2)
        logger.log(2, {"loss": 1.23456, "tokens_per_s": 1e4})
        logger.advance(3)
    table, train = read_metrics(logger.path)
    assert table["kind"] == "table" and table["rows"] == [["In the", "beginning"]]
    assert "[student] train step 2/20 loss=1.235 tokens_per_s=1e+04" in capsys.readouterr().err


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with _logger(tmp_path, wandb="offline") as logger:
        logger.log(1, {"loss": 2.0})
        logger.log_table("samples", ["text"], [["hello"]], step=1)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(logger._wandb_kwargs["id"])
    assert list(runs[0].glob("*.wandb"))
    # Same run + stage -> same id, so a resumed stage continues the same wandb run.
    assert _logger(tmp_path / "x")._wandb_kwargs["id"] == logger._wandb_kwargs["id"]


def test_wandb_mode_env_overrides_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with _logger(tmp_path, wandb="offline") as logger:
        logger.log(1, {"loss": 2.0})
    assert not (tmp_path / "run" / "wandb").exists()


def test_check_finite():
    assert check_finite(5, {"loss": 1.0, "grad_norm": 0.3, "lr": float("nan")}, policy="stop")
    bad = {"loss": float("nan"), "grad_norm": math.inf}
    with pytest.raises(NonFiniteError, match=r"loss=nan, grad_norm=inf at step 7") as err:
        check_finite(7, bad, policy="stop")
    for remedy in ("learning rate", "clipping", "float32"):
        assert remedy in str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert check_finite(7, bad, policy="skip") is False
    assert check_finite(7, {"loss": None}, policy="skip") is False


def test_throughput_with_fake_clock():
    now = [0.0]
    tp = Throughput(clock=lambda: now[0])
    assert tp.rates() == {}
    now[0] = 30.0
    tp.tick(tokens=100)  # first step: compile, only starts the clock
    for _ in range(4):
        now[0] += 0.5
        tp.tick(tokens=100)
    assert tp.rates() == {"steps_per_s": 2.0, "tokens_per_s": 200.0}
    with tp.paused():  # eval / checkpoint time is not training time
        now[0] += 10.0
    for _ in range(2):
        now[0] += 0.25
        tp.tick(tokens=50)
    assert tp.rates() == {"steps_per_s": 4.0, "tokens_per_s": 200.0}
    assert tp.rates() == {}  # no steps in this interval
