"""The device mesh and the rules that place named tensor axes on it.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, ...; see
`train/models/layers.py`), and activations are constrained by the same names. This module turns
the `mesh:` block of a pipeline (`MeshConfig`) into a `jax.sharding.Mesh` with the axes
`data`, `fsdp` and `tensor`, and maps logical names to mesh axes by rules, so that one model
definition runs data parallel, FSDP (ZeRO-3: parameters and optimizer state sharded), tensor
parallel or any mix, chosen in YAML:

    mesh = make_mesh(cfg.mesh)                     # e.g. {data: -1, fsdp: 1, tensor: 1}
    rules = cfg.mesh.logical_rules()               # DEFAULT_RULES + the config's overrides
    model = init_sharded(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)), mesh=mesh, rules=rules)
    params = nnx.state(model, nnx.Param)
    p_shard = param_shardings(params, mesh=mesh, rules=rules)
    opt_shard = like_params_shardings(opt_state, params=params, shardings=p_shard)
    tokens = jax.device_put(tokens, batch_sharding(mesh))

The placement is a hint to XLA's SPMD partitioner, not a different program: the same step on
any mesh computes the same numbers (tests/test_mesh.py checks a train step on 2x2x2 against one
device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from train.models.layers import param_axes

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | Sequence[str] | None]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "lru": "tensor",
    "layers": None,
    "head_dim": None,
    "seq": None,
    "conv": None,
    "lru_block": None,
    "lru_block_out": None,
}
"""Logical axis name -> mesh axis (or axes, or None for replicated).

- `batch` spans `data` and `fsdp`: FSDP is data parallelism whose replicas also split the
  weights, so both axes see different examples; gradients are reduced over both.
- `embed` -> `fsdp` is the ZeRO-3 choice: every matrix has a d_model dimension, so sharding it
  splits every parameter (and the optimizer moments that mirror it) over the fsdp replicas;
  XLA all-gathers a layer's weights just before use and reduce-scatters its gradients.
- `heads`, `kv`, `mlp`, `vocab`, `lru` -> `tensor` is Megatron-style tensor parallelism: the
  wide dimensions of attention, MLP, the (tied) embedding and the recurrence are split so that
  each matmul pair needs one collective. `kv` can be smaller than the tensor axis (multi-query
  attention has one head); `spec_for` then leaves it replicated.
- `layers` (the stacked, scanned axis), `head_dim`, `seq`, `conv` and the Griffin gate blocks stay
  replicated: splitting `layers` would serialise the scan across devices, `head_dim` is small and
  contracted inside attention, and sequence parallelism is not used at these lengths.
"""


class MeshError(ValueError):
    """A mesh or sharding-rule setting that cannot work; the message names the offending key."""


def _check_sizes(sizes: Mapping[str, int]) -> None:
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise MeshError(
                f"mesh.{name}={size}: sizes must be >= 1, or -1 to fill the remaining devices"
            )
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got {' and '.join(fill)} = -1")


def _check_rules(rules: Rules) -> None:
    for logical, target in rules.items():
        for axis in _as_axes(target):
            if axis not in MESH_AXES:
                raise MeshError(
                    f"mesh.rules.{logical}: unknown mesh axis {axis!r}; use one of {MESH_AXES} "
                    "or null (replicated)"
                )


class MeshConfig(BaseModel):
    """How the devices are arranged: data x fsdp x tensor, and which named axes go where."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(
        None,
        description="A file configs/mesh/<preset>.yaml (data_parallel, fsdp, fsdp_tensor) whose "
        "keys are defaults here; keys given next to it win, and `rules` merge key by key.",
    )
    data: int = Field(
        -1,
        description="Pure data-parallel replicas: each holds a full copy of the parameters and "
        "sees its own slice of the batch. -1 takes whatever devices the other axes leave.",
    )
    fsdp: int = Field(
        1,
        description="Fully sharded data parallel (ZeRO-3): replicas that also split parameters "
        "and optimizer state along `embed`, trading an all-gather per layer for memory.",
    )
    tensor: int = Field(
        1,
        description="Tensor (model) parallel: heads, MLP width and vocab are split; keep it within "
        "a host, since every layer communicates over it.",
    )
    rules: dict[str, str | list[str] | None] = Field(
        default_factory=dict,
        description="Overrides of DEFAULT_RULES, logical name -> mesh axis, list of axes, or "
        "null (replicated); e.g. {embed: null} turns FSDP's weight sharding off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = load_mesh_preset(data["preset"])
        rules = {**(preset.get("rules") or {}), **(data.get("rules") or {})}
        return {**preset, **data, "rules": rules}

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        _check_sizes(self.sizes)
        _check_rules(self.rules)
        return self

    @property
    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def logical_rules(self) -> dict[str, str | tuple[str, ...] | None]:
        """DEFAULT_RULES with this config's overrides applied (what `spec_for` takes)."""
        merged = dict(DEFAULT_RULES)
        merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in self.rules.items()})
        return merged


MESH_PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "mesh"


def load_mesh_preset(name: str) -> dict:
    """The `mesh:` keys of configs/mesh/<name>.yaml."""
    path = MESH_PRESETS_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        valid = ", ".join(sorted(p.stem for p in MESH_PRESETS_DIR.glob("*.yaml")))
        raise ValueError(f"unknown mesh preset {name!r}; valid: {valid}")
    data = yaml.safe_load(path.read_text()) or {}
    if "preset" in data:
        raise ValueError(f"{path}: a mesh preset cannot name another preset")
    return data


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_mesh_shape(cfg: MeshConfig, *, num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor) with the -1 axis filled; their product is num_devices."""
    sizes = cfg.sizes
    _check_sizes(sizes)  # again: a config built with model_construct skips validation
    fixed = math.prod(s for s in sizes.values() if s != -1)
    desc = " x ".join(f"{k}={v}" for k, v in sizes.items() if v != -1)
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            divisors = ", ".join(map(str, _divisors(num_devices)))
            raise MeshError(
                f"mesh: {desc} = {fixed} does not divide {num_devices} devices; valid: sizes "
                f"whose product is one of {divisors}, so that mesh.{fill[0]}=-1 fills the rest"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh: {desc} = {fixed} does not match {num_devices} devices; valid: sizes whose "
            f"product is {num_devices}, or set one of data/fsdp/tensor to -1 to fill the rest"
        )
    return sizes


def make_mesh(cfg: MeshConfig, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: every process's devices).

    Axis types are Auto: shardings are hints that XLA propagates, so model code needs no
    sharding-aware operations (jax.make_mesh now defaults to Explicit, which would).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, num_devices=len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _as_axes(target: str | Sequence[str] | None) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def spec_for(
    axes: Sequence[str], shape: Sequence[int], *, mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical `axes` (one name per dimension).

    A mesh axis shards at most one dimension (the first that asks for it); a dimension whose
    size is not divisible by its mesh axes stays replicated rather than padded (tiny test
    models have e.g. vocab 61); size-1 mesh axes are left out, and unknown names replicate.
    """
    if len(axes) != len(shape):
        raise MeshError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = []
        for axis in _as_axes(rules.get(name)):
            if axis not in mesh.shape:
                raise MeshError(f"mesh.rules.{name}: {axis!r} is not a mesh axis {mesh.axis_names}")
            if axis not in used and mesh.shape[axis] > 1:
                mesh_axes.append(axis)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % ways:
            entries.append(None)
            continue
        used.update(mesh_axes)
        entries.append(mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*entries)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(state: nnx.State, *, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for an `nnx.state(model, nnx.Param)` (concrete or from nnx.eval_shape).

    The result has the state's structure (each Variable holds a NamedSharding), so it can be
    passed to jax.device_put or as jit in/out_shardings for that state.
    """
    axes = param_axes(state)

    def one(var: nnx.Variable, names: tuple[str, ...]) -> nnx.Variable:
        shape = var.get_value().shape
        return var.replace(NamedSharding(mesh, spec_for(names, shape, mesh=mesh, rules=rules)))

    return jax.tree.map(one, state, axes, is_leaf=_is_variable)


def shard_params(model: nnx.Module, *, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move a model's parameters onto the mesh, in place; returns the model for chaining.

    This copies from wherever the parameters are; to never hold the whole model on one
    device, build it with `init_sharded` instead.
    """
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh=mesh, rules=rules)))
    return model


def init_sharded(make_model: Callable[[], nnx.Module], *, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Build `make_model()` with every parameter created directly in its shards.

    The constructor is traced once for shapes (nnx.eval_shape), then run under jit with output
    shardings, so XLA computes each device's slice of the initialisers in place: a model larger
    than one device's memory can be created. The values do not depend on the mesh (random
    bits are drawn per element), so a seed gives the same model on any mesh.
    Non-parameter state (e.g. RNG counters) is replicated.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    out_shardings = (
        param_shardings(abs_params, mesh=mesh, rules=rules),
        jax.tree.map(lambda _: replicated, abs_rest),
    )

    def build():
        _, params, rest = nnx.split(make_model(), nnx.Param, ...)
        return params, rest

    params, rest = jax.jit(build, out_shardings=out_shardings)()
    return nnx.merge(graphdef, params, rest)


def _key_token(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_tokens(path: tuple) -> tuple[str, ...]:
    """A key path as plain strings, without the `.value` of a Variable, so that a param State,
    its pure-dict form and an optax state built on either all spell a parameter alike."""
    tokens = tuple(_key_token(k) for k in path)
    return tokens[:-1] if tokens and tokens[-1] == "value" else tokens


def like_params_shardings(tree: Any, *, params: Any, shardings: Any) -> Any:
    """Shardings for a tree whose array leaves mirror parameters (e.g. optax optimizer state).

    A leaf whose key path ends with a parameter's path and has that parameter's shape (Adam's
    mu and nu) gets the parameter's sharding, so optimizer state is split exactly like the
    weights (ZeRO). Everything else (step counts, factored statistics) is replicated.
    """
    param_leaves = jax.tree_util.tree_leaves_with_path(params)
    sharding_leaves = jax.tree.leaves(shardings)
    if len(param_leaves) != len(sharding_leaves):
        raise MeshError(
            f"params has {len(param_leaves)} leaves but shardings has {len(sharding_leaves)}"
        )
    by_path = {
        _path_tokens(path): (tuple(np.shape(leaf)), sharding)
        for (path, leaf), sharding in zip(param_leaves, sharding_leaves, strict=True)
    }
    meshes = {s.mesh for s in sharding_leaves}
    if len(meshes) != 1:
        raise MeshError(f"shardings must all be on one mesh, got {len(meshes)}")
    replicated = NamedSharding(meshes.pop(), PartitionSpec())

    def one(path: tuple, leaf: Any) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        if not shape:
            return replicated
        tokens = _path_tokens(path)
        for start in range(len(tokens)):  # longest suffix first
            hit = by_path.get(tokens[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays (tokens, positions, segment ids): batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the global batch must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_constraint(x: jax.Array, axes: Sequence[str], *, mesh: Mesh, rules: Rules) -> jax.Array:
    """Pin an activation's sharding by logical names (e.g. ('batch', 'seq', 'embed')).

    Used where XLA's propagation would otherwise guess badly (after the embedding gather, at
    the logits); a no-op on one device so that single-device code pays nothing.
    """
    if mesh.size == 1:
        return x
    spec = spec_for(axes, x.shape, mesh=mesh, rules=rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
