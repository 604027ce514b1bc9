"""The dry run's parameter sharding table and per-device memory estimate; the mesh presets."""

from pathlib import Path

import jax
import pytest

import launch
from train.config import ConfigError, load_config
from train.loop import abstract_params
from train.memory import estimate, parameter_rows
from train.mesh import MESH_PRESETS_DIR, MeshConfig, make_mesh

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests/configs/base.yaml"


def stage_estimate(overrides=()):
    cfg = load_config(BASE, list(overrides))
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.logical_rules()
    return estimate(cfg.models["m"], cfg.stages["a"], mesh=mesh, rules=rules)


def test_dry_run_prints_every_parameter_and_a_memory_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch.main([str(BASE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(BASE)
    mesh = make_mesh(cfg.mesh)
    _, abstract, shardings = abstract_params(
        cfg.models["m"], mesh=mesh, rules=cfg.mesh.logical_rules()
    )
    rows = parameter_rows(abstract, shardings)
    assert sum(int(r[-1]) for r in rows) == len(jax.tree.leaves(abstract))
    for name, shape, _dtype, spec, *_ in rows:
        assert any(name in line and shape in line and spec in line for line in out.splitlines())
    assert "memory per device, stage 'a' (m): params" in out and "activations" in out
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing allocated on disk


def test_fsdp_splits_parameter_and_optimizer_memory_eight_ways():
    dp, _ = stage_estimate()
    fsdp, rows = stage_estimate(["mesh.data=1", "mesh.fsdp=8"])
    # every matrix splits along d_model; only the small per-head norm scales stay whole
    assert dp.params / 8 <= fsdp.params <= dp.params / 8 * 1.05
    assert dp.optimizer / 8 <= fsdp.optimizer <= dp.optimizer / 8 * 1.05
    assert any("fsdp" in r[3] for r in rows)
    assert fsdp.activations == dp.activations  # the batch is split 8 ways in both


def test_remat_full_saves_less_than_none():
    none, _ = stage_estimate()
    full, _ = stage_estimate(["models.m.remat=full"])
    assert full.activations < none.activations and full.params == none.params


@pytest.mark.parametrize("path", sorted(MESH_PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_mesh_presets_load_and_fit_eight_devices(path):
    cfg = load_config(BASE, [f"mesh={{preset: {path.stem}}}"])
    assert cfg.mesh.preset == path.stem
    make_mesh(cfg.mesh)


def test_mesh_preset_keys_next_to_it_win():
    m = MeshConfig.model_validate({"preset": "fsdp_tensor", "tensor": 4, "rules": {"vocab": None}})
    assert (m.data, m.fsdp, m.tensor) == (1, -1, 4)
    rules = m.logical_rules()
    assert rules["vocab"] is None and rules["mlp"] == "tensor" and rules["embed"] == "fsdp"
    with pytest.raises(ConfigError, match="unknown mesh preset 'zero3'"):
        load_config(BASE, ["mesh={preset: zero3}"])
