"""Checkpoints of a training stage: save, keep the last N, restore onto any mesh, survive a crash.

    ckpt = Checkpointer(directory=stage_dir / "checkpoints", keep=cfg.keep, async_save=True)
    restored = ckpt.restore_latest(abstract_state=abstract)  # None: nothing to resume from
    if restored is not None:
        start, state, meta = restored.step, restored.state, restored.meta
    ...
    if step % cfg.every == 0:
        ckpt.save(step, state={"params": p, "opt_state": o, "rng": key}, meta={"next_index": i})
    ckpt.close()  # waits for a save still being written

`state` is a dict of pytrees of arrays (jax, numpy or Python scalars; typed PRNG keys are
stored as their raw key data and rebuilt on restore); `meta` is anything JSON can hold (the
data iterator position, the config hash). `abstract_state` mirrors `state` with
`jax.ShapeDtypeStruct` leaves that carry the target shardings, so a checkpoint written from
one mesh restores directly onto another; it may name a subset of the saved state (a later
stage can take just `{"params": ...}` from a finished one).

On disk, one orbax `CheckpointManager` step per checkpoint:

    <directory>/<step>/state/          the arrays (orbax PyTree, OCDBT)
    <directory>/<step>/meta/metadata   `meta` as JSON
    <directory>/unreadable/<step>      a step that failed to restore, set aside (see below)

What makes "nothing is lost on a crash" hold:
* Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
  once every item is written, so a step directory that is listed is complete; a SIGKILL
  mid-save leaves only a tmp directory, which is ignored and removed on the next start.
* With `keep=N`, older steps are deleted by the save's finalize step, after the new step is
  renamed into place, so the last complete checkpoint always survives an interrupted save.
* `restore_latest` falls back to the previous step when the newest one does not restore
  (a file truncated or missing, metadata unreadable), warning with the step and the error.
  A request that does not fit the checkpoint (a missing key, another shape) is the caller's
  error and raises `CheckpointMismatchError` instead of silently falling back.

`params_sha256` fingerprints parameters for the run manifest: same values, same hash, whatever
the sharding or mesh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pydantic
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_UNREADABLE = "unreadable"


class CheckpointConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    every: int = pydantic.Field(200, ge=1)
    """Steps between checkpoints; a resumed run repeats at most this many steps."""
    keep: int = pydantic.Field(3, ge=1)
    """Keep the newest N checkpoints. At least 2 leaves a fallback if the newest is unreadable."""
    async_save: bool = True
    """Write to disk in a background thread once the arrays are on the host, so training goes
    on during the write; the next save (or close) waits for it."""


class Restored(NamedTuple):
    """What `Checkpointer.restore_latest` returns: the step and what was saved at it."""

    step: int
    state: dict[str, Any]
    meta: Any


class CheckpointMismatchError(ValueError):
    """The requested `abstract_state` does not fit the checkpoint (missing keys, other shapes).

    A caller's error, not a damaged checkpoint, so `restore_latest` never falls back on it."""


class Checkpointer:
    """Saves and restores `(state, meta)` per step in one directory, keeping the last `keep`."""

    def __init__(self, *, directory: str | os.PathLike, keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # Tmp directories are saves a crash interrupted: never listed, so safe to remove.
            cleanup_tmp_directories=True,
        )
        # Handlers fixed up front so metadata can be read before anything was saved or restored
        # in this process; the PyTree handler (not Standard) because it restores a subset.
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    def save(self, step: int, *, state: dict[str, Any], meta: Any) -> None:
        """Write checkpoint `step`; with async_save it returns once the arrays are on the host.

        The caller may donate or overwrite `state` right after (orbax copies device buffers to
        the host before returning). Raises if `step` already exists or a previous async save
        failed.
        """
        json.dumps(meta)  # fail here, not in the background thread
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)
        )
        # force: the caller decides when to save (every N steps, SIGTERM, the end of the stage).
        self._manager.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        """The newest step, counting one whose async save is still being written."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step in the directory, oldest first (see `latest_step`)."""
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None = None, *, abstract_state: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """Return `(state, meta)` of `step` (default: the newest), placed as `abstract_state` says.

        Leaves of `abstract_state` are `jax.ShapeDtypeStruct`s (or arrays) whose sharding says
        where the restored array goes; without a sharding a leaf comes back as numpy. A dtype
        other than the stored one is a cast. No fallback: see `restore_latest`.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._restore(step, abstract_state)

    def restore_latest(self, *, abstract_state: dict[str, Any]) -> Restored | None:
        """Restore the newest step that restores; None if there is none.

        A step that fails to read is logged as a WARNING (step and error) and the previous one
        is tried. Once an older step restores, the unreadable newer ones are moved to
        `<directory>/unreadable/` (kept for inspection, never deleted) so the resumed run can
        save those steps again and keep-N does not count them. When nothing restores, nothing is
        moved: the cause may be on this side (memory, the filesystem), not in the checkpoints.
        """
        self.wait()
        failed = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self._restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any failure to read: try the previous step
                first_line = (str(e).strip().splitlines() or [""])[0][:500]
                log.warning(
                    "checkpoint step %d in %s does not restore (%s: %s); trying the previous one",
                    step, self.directory, type(e).__name__, first_line,
                )  # fmt: skip
                failed.append(step)
                continue
            if failed:
                self._set_aside(failed)
            return Restored(step, state, meta)
        if failed:
            log.warning("no checkpoint in %s restores (tried steps %s)", self.directory, failed)
        return None

    def wait(self) -> None:
        """Block until an async save is on disk; raise if it failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        """Wait for a pending save, then release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        target = _abstract_keys_to_data(abstract_state)
        # Metadata first: it tells a damaged step (unreadable) from a request that cannot fit,
        # which orbax's partial restore would otherwise answer with the abstract leaf itself.
        stored = self._manager.item_metadata(step)["state"]
        _check_fits(target, stored.tree, step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=restore_args, partial_restore=True
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return _data_to_keys(out["state"], abstract_state), out["meta"]

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.directory / _UNREADABLE
            aside.mkdir(exist_ok=True)
            for step in steps:
                dest = aside / str(step)
                if dest.exists():
                    dest = aside / f"{step}.{time.time_ns()}"
                os.rename(self.directory / str(step), dest)
                log.warning("moved unreadable checkpoint step %d to %s", step, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("distillax_checkpoint_set_aside")
        self._manager.reload()


def _check_fits(target: Any, stored_tree: Any, step: int) -> None:
    """Raise CheckpointMismatchError unless every leaf of `target` is stored with its shape."""
    stored = ocp.tree.to_flat_dict(stored_tree)
    problems = []
    for key, want in ocp.tree.to_flat_dict(target).items():
        name = ".".join(key)
        if key not in stored:
            problems.append(f"{name}: not in the checkpoint")
            continue
        have = getattr(stored[key], "shape", None)
        if have is not None and tuple(have) != tuple(want.shape):
            problems.append(f"{name}: stored shape {tuple(have)}, requested {tuple(want.shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatchError(
            f"checkpoint step {step} does not fit the requested state: "
            + "; ".join(problems[:5])
            + more
        )


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data, which orbax (and numpy) can store."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(abstract: Any) -> Any:
    def convert(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        # A NamedSharding of the key shape also fits the key data: its trailing axis replicates.
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(convert, abstract)


def _data_to_keys(restored: Any, abstract: Any) -> Any:
    def convert(want, got):
        if not _is_key(want):
            return got
        impl = jax.random.key_impl(jnp.zeros((0,), want.dtype))  # the impl of a key dtype
        return jax.random.wrap_key_data(got, impl=impl)

    return jax.tree.map(convert, abstract, restored)


def params_sha256(tree: Any) -> str:
    """Hex SHA-256 of a pytree's values, independent of sharding, mesh and device.

    Leaves are taken in sorted key-path order; each contributes its path, dtype and shape, then
    the bytes of its host copy in C order (native byte order, little-endian wherever JAX runs).
    Typed PRNG keys count as their key data. An array spread over processes is gathered first,
    so every process must call this together.
    """
    leaves = jax.tree_util.tree_flatten_with_path(_keys_to_data(tree))[0]
    named = sorted(
        ((jax.tree_util.keystr(path), leaf) for path, leaf in leaves), key=lambda t: t[0]
    )
    digest = hashlib.sha256()
    for name, leaf in named:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            host = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        else:
            host = np.asarray(jax.device_get(leaf))
        digest.update(f"{name}\0{host.dtype}\0{host.shape}\0".encode())
        digest.update(np.ascontiguousarray(host).tobytes())
    return digest.hexdigest()
