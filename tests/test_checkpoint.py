"""train/checkpoint.py: round trip, keep-N, async, corrupt-latest fallback, restore onto another
mesh, params_sha256. Small trees: every test runs in a second or two on CPU."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointMismatchError,
    params_sha256,
)

REPO = Path(__file__).resolve().parents[1]


def make_params(scale: float = 1.0, sharding=None):
    """A small model-like tree: int keys as in an NNX pure dict, float32 and bfloat16 leaves.

    Arrays are > 1 KiB so OCDBT stores them in data files rather than inline in its manifest."""
    params = {
        "embed": jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) * scale,
        "blocks": {
            0: {"w": jnp.full((16, 32), 0.5 * scale, jnp.bfloat16)},
            1: {"w": jnp.linspace(-1, 1, 16 * 32, dtype=jnp.float32).reshape(16, 32) * scale},
        },
    }
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return params


def make_state(scale: float = 1.0, sharding=None):
    params = make_params(scale, sharding)
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-zero moments, count=1
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key(int(scale))}


def abstract(tree, sharding=None):
    """ShapeDtypeStructs of `tree`, on `sharding` (a fixed one, or a function of the leaf)."""

    def one(x):
        s = sharding(x) if callable(sharding) else sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s or x.sharding)

    return jax.tree.map(one, tree)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_defaults_and_strictness():
    cfg = CheckpointConfig()
    assert (cfg.every, cfg.keep, cfg.async_save) == (200, 3, True)
    with pytest.raises(ValueError):
        CheckpointConfig(evry=10)
    with pytest.raises(ValueError):
        CheckpointConfig(keep=0)


def test_round_trip(tmp_path):
    state = make_state()
    meta = {"next_index": 123, "config_hash": "abc", "step": 7}
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(7, state=state, meta=meta)
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    # A fresh Checkpointer, as after a restart, sees the step on disk.
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        restored, restored_meta = ckpt.restore(abstract_state=abstract(state))
    assert restored_meta == meta
    assert_tree_equal(restored, state)
    # optax's NamedTuple states come back as themselves, so opt.update accepts them.
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    np.testing.assert_array_equal(
        jax.random.uniform(restored["rng"], (4,)), jax.random.uniform(state["rng"], (4,))
    )


def test_restore_a_subset(tmp_path):
    state = make_state()
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(1, state=state, meta={})
        restored, _ = ckpt.restore(1, abstract_state={"params": abstract(state["params"])})
    assert list(restored) == ["params"]
    assert_tree_equal(restored["params"], state["params"])


def test_mismatch_raises_and_moves_nothing(tmp_path):
    state = make_state()
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(1, state=state, meta={})
        missing = {
            "params": {
                **abstract(state["params"]),
                "extra": jax.ShapeDtypeStruct((2,), jnp.float32),
            }
        }
        with pytest.raises(CheckpointMismatchError, match="params.extra: not in the checkpoint"):
            ckpt.restore_latest(abstract_state=missing)
        reshaped = abstract(state)
        reshaped["params"]["embed"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)
        with pytest.raises(CheckpointMismatchError, match=r"params.embed: stored shape \(16, 32\)"):
            ckpt.restore_latest(abstract_state=reshaped)
        assert ckpt.all_steps() == [1]
    assert not (tmp_path / "unreadable").exists()


def test_keep_n_deletes_only_after_the_newer_step_is_complete(tmp_path):
    ckpt = Checkpointer(directory=tmp_path, keep=2, async_save=True)
    # Orbax internals, on purpose: check the property we rely on, that an old step is deleted
    # only once the newer one has been renamed into place (a tmp dir is not a finished step).
    deleter = ckpt._manager._checkpoint_deleter
    delete_steps = deleter.delete_steps
    seen = []

    def checked_delete_steps(steps):
        newest = max(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
        seen.append((list(steps), newest))
        return delete_steps(steps)

    deleter.delete_steps = checked_delete_steps
    for step in range(1, 5):
        ckpt.save(step, state=make_state(step), meta={"step": step})
    ckpt.close()
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
    # Step 1 was deleted when step 3 was complete on disk, step 2 once step 4 was.
    assert [(s, n) for s, n in seen if s] == [([1], 3), ([2], 4)]


def test_async_save_survives_donated_buffers(tmp_path):
    state = make_state(3.0)
    host = jax.device_get(jax.tree.map(lambda x: x, state))
    target = abstract(state)
    ckpt = Checkpointer(directory=tmp_path, keep=3, async_save=True)
    ckpt.save(5, state=state, meta={"next_index": 5})
    # As if the next jitted step donated the state: the device buffers are gone.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    ckpt.close()
    with Checkpointer(directory=tmp_path, keep=3, async_save=True) as ckpt:
        restored = ckpt.restore_latest(abstract_state=target)
    assert restored.step == 5 and restored.meta == {"next_index": 5}
    assert_tree_equal(restored.state, host)


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


# Orbax's reader leaves a coroutine behind on a failed read; its "event loop is closed" noise
# is not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete_data_file", "truncate_data_files", "empty_metadata"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state=make_state(step), meta={"next_index": step * 10})
    step3 = tmp_path / "3"
    if damage == "delete_data_file":
        _data_files(step3)[0].unlink()
    elif damage == "truncate_data_files":
        for path in _data_files(step3):
            os.truncate(path, path.stat().st_size // 2)
    else:
        (step3 / "state" / "_METADATA").write_text("")

    target = abstract(make_state())
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        ckpt = Checkpointer(directory=tmp_path, keep=3, async_save=False)
        restored = ckpt.restore_latest(abstract_state=target)
    assert restored.step == 2 and restored.meta == {"next_index": 20}
    assert_tree_equal(restored.state, make_state(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint step 3" in m and "does not restore" in m for m in warnings), warnings
    # The damaged step is set aside, not deleted, and the resumed run can write step 3 again.
    assert (tmp_path / "unreadable" / "3").is_dir() and not step3.exists()
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, state=make_state(3), meta={"next_index": 30})
    assert ckpt.restore_latest(abstract_state=target).step == 3
    ckpt.close()


def test_nothing_restores_returns_none(tmp_path, caplog):
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(1, state=make_state(), meta={})
    (tmp_path / "1" / "state" / "_METADATA").write_text("")
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
            assert ckpt.restore_latest(abstract_state=abstract(make_state())) is None
    assert "no checkpoint" in caplog.text
    assert (tmp_path / "1").exists()  # nothing restored, so nothing is moved


def test_empty_directory(tmp_path):
    with Checkpointer(directory=tmp_path / "checkpoints", keep=3, async_save=True) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.restore_latest(abstract_state=abstract(make_state())) is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract_state=abstract(make_state()))


def test_unfinished_tmp_dir_is_ignored_and_removed(tmp_path):
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(1, state=make_state(), meta={})
    # What a SIGKILL mid-save leaves behind: a step that was never renamed into place.
    tmp = tmp_path / "2.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")
    with Checkpointer(directory=tmp_path, keep=3, async_save=False) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.restore_latest(abstract_state=abstract(make_state())).step == 1
        ckpt.save(2, state=make_state(2), meta={})
    assert not tmp.exists()


def test_restore_onto_another_mesh(tmp_path):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    saved_sharding = NamedSharding(mesh, P("fsdp", ("data", "tensor")))
    state = make_state(sharding=saved_sharding)
    state["rng"] = jax.device_put(
        jax.random.split(jax.random.key(4), 8), NamedSharding(mesh, P("data"))
    )
    with Checkpointer(directory=tmp_path, keep=3, async_save=True) as ckpt:
        ckpt.save(1, state=state, meta={})

    other = jax.make_mesh((4, 2), ("x", "y"))
    targets = {
        "4x2 mesh": lambda x: NamedSharding(other, P("y", "x") if x.ndim == 2 else P()),
        "one device": SingleDeviceSharding(jax.devices()[3]),
    }
    for name, sharding in targets.items():
        target = abstract(state, sharding)
        with Checkpointer(directory=tmp_path, keep=3, async_save=True) as ckpt:
            restored, _ = ckpt.restore(abstract_state=target)
        assert_tree_equal(restored, state)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), name


def test_params_sha256():
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    params = make_params()
    digest = params_sha256(params)
    assert len(digest) == 64
    assert params_sha256(jax.device_put(params, NamedSharding(mesh, P("a", "b")))) == digest
    assert params_sha256(jax.device_put(params, SingleDeviceSharding(jax.devices()[5]))) == digest
    assert params_sha256(jax.device_get(params)) == digest  # numpy host copies

    changed = make_params()
    changed["blocks"][1]["w"] = changed["blocks"][1]["w"].at[3, 7].add(1e-3)
    assert params_sha256(changed) != digest
    as_bf16 = {**make_params(), "embed": jnp.zeros((16, 32), jnp.bfloat16)}
    as_f32 = {**make_params(), "embed": jnp.zeros((16, 16), jnp.float32)}  # same byte count
    assert params_sha256(as_bf16) != params_sha256(as_f32)
    renamed = {**make_params()}
    renamed["embedding"] = renamed.pop("embed")
    assert params_sha256(renamed) != digest


def test_sigkill_during_saves_keeps_a_restorable_checkpoint(tmp_path):
    """A process killed at an arbitrary moment of an async save loop leaves a latest step that
    restores to exactly what was saved at that step. About a second: a small subprocess."""
    script = textwrap.dedent(
        f"""
        import sys, jax, jax.numpy as jnp
        sys.path.insert(0, {str(REPO)!r})
        from train.checkpoint import Checkpointer
        ckpt = Checkpointer(directory={str(tmp_path)!r}, keep=2, async_save=True)
        for step in range(1, 10_000):
            w = jnp.full((256, 1024), step, jnp.float32)
            ckpt.save(step, state={{"params": {{"w": w}}}}, meta={{"step": step}})
            print(step, flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stdout:
            if int(line) >= 5:
                break
        time.sleep(0.05)  # land somewhere inside a later save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    target = {
        "params": {
            "w": jax.ShapeDtypeStruct(
                (256, 1024), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
            )
        }
    }
    with Checkpointer(directory=tmp_path, keep=2, async_save=True) as ckpt:
        assert len(ckpt.all_steps()) >= 1
        restored = ckpt.restore_latest(abstract_state=target)
    assert restored.step >= 4 and restored.meta == {"step": restored.step}
    assert bool((restored.state["params"]["w"] == restored.step).all())
