"""Config validation: every shipped YAML loads; every malformed one fails early and clearly.

Each file in tests/configs/bad/ starts with `# expect: <text>`: launching it must exit with
status 2, print that text and the file name, print no traceback, and write nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import launch
from train.config import ConfigError, apply_override, load_config, parse_config, parse_override

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((ROOT / "tests/configs/bad").glob("*.yaml"))
# models/ and mesh/ hold presets, not pipelines (tests/test_presets.py, tests/test_memory.py);
# sweeps/ are validated by tests/test_sweep.py
SHIPPED = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if not {"models", "mesh", "sweeps"} & set(p.parts)
)


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def test_there_are_enough_bad_configs():
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.order


def test_base_test_config_is_valid():
    cfg = load_config(ROOT / "tests/configs/base.yaml")
    assert cfg.models["m"].d_model == 32 and cfg.models["m"].vocab_size == 300


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_config_fails_clearly(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written would land here
    rc = launch.main([str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected(path) in err, err
    assert str(path) in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["02-stage-field-typo", "25-yaml-syntax", "14-mesh-does-not-fit"])
def test_bad_config_exit_status_in_a_real_process(name, tmp_path):
    path = ROOT / "tests/configs/bad" / f"{name}.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert expected(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_overrides_address_the_tree():
    base = ROOT / "tests/configs/base.yaml"
    cfg = load_config(base, ["stages.a.steps=7", "stages.a.optim.lr=1e-2", "run.name=x"])
    assert cfg.stages["a"].steps == 7 and cfg.stages["a"].optim.lr == 1e-2
    assert cfg.run.name == "x"
    with pytest.raises(ConfigError, match=r"stages\.a\.optim\.lrr: unknown key"):
        load_config(base, ["stages.a.optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(base, ["stages.a.steps"])


def test_override_values_are_yaml_scalars_and_lists_take_indices():
    tree = {"a": {"b": [1, {"c": 2}]}}
    for text in ["a.b.1.c=[3, 4]", "a.x=null", "a.y=true"]:
        apply_override(tree, *parse_override(text), text=text)
    assert tree == {"a": {"b": [1, {"c": [3, 4]}], "x": None, "y": True}}
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(tree, *parse_override("a.b.5=1"), text="a.b.5=1")
    apply_override(tree, *parse_override("~a.x"), text="~a.x")
    assert tree == {"a": {"b": [1, {"c": [3, 4]}], "y": True}}
    with pytest.raises(ConfigError, match="there is no a.x"):
        apply_override(tree, *parse_override("~a.x"), text="~a.x")


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = launch.main([str(ROOT / "tests/configs/base.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| a     | pretrain | run" in out and "seq_len: 32" in out
    assert list(tmp_path.iterdir()) == []


def test_stage_hash_tracks_upstream_and_ignores_execution_details():
    text = (ROOT / "tests/configs/base.yaml").read_text()
    two = text + "  b: {kind: pretrain, model: m, init: {stage: a}, steps: 5}\n"
    raw = yaml.safe_load(two)
    cfg = parse_config(raw, num_devices=8)
    assert cfg.order == ("a", "b")
    raw["stages"]["a"]["steps"] = 31
    changed = parse_config(raw, num_devices=8)
    assert changed.stage_hash("a") != cfg.stage_hash("a")
    assert changed.stage_hash("b") != cfg.stage_hash("b")  # upstream changed
    raw["stages"]["a"]["steps"] = 30
    raw["models"]["m"]["scan_layers"] = False
    raw["logging"]["every"] = 1
    same = parse_config(raw, num_devices=8)
    assert same.stage_hash("b") == cfg.stage_hash("b")
