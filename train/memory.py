"""Where every parameter goes on the mesh, and a per-device memory estimate, from shapes alone.

    print(describe_memory(cfg))          # launch.py --dry-run prints this after the plan

For each model a training stage uses: one row per parameter (layers that repeat collapse into one
row with a count) with its shape, dtype, PartitionSpec and bytes per device; then per training
stage the estimated bytes per device of parameters, gradients, optimizer state and activations.
Everything comes from `jax.eval_shape` and the shardings the stage would use, so nothing is
allocated and a 27B model can be planned on a laptop (the mesh is built over the devices this
process sees; set JAX_NUM_CPU_DEVICES to plan for another count).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import numpy as np

from train.report import format_table


@dataclass
class MemoryEstimate:
    """Bytes per device of one training stage."""

    params: int
    grads: int
    optimizer: int
    activations: int | None  # None: not estimated (a stage whose batches are rollouts)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + (self.activations or 0)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed by `shardings`.

    With uneven placement the largest shard counts; replicated leaves count whole."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shape = sh.shard_shape(tuple(leaf.shape)) if leaf.shape else ()
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _spec_text(spec) -> str:
    parts = []
    for entry in spec:
        if entry is None:
            parts.append("-")
        elif isinstance(entry, tuple):
            parts.append("(" + ",".join(entry) + ")")
        else:
            parts.append(entry)
    return "(" + ", ".join(parts) + ")" if parts else "()"


def parameter_rows(abstract, shardings) -> list[list[str]]:
    """Table rows (path, shape, dtype, spec, per device, count); numbered layers collapse to `*`."""
    rows: dict[tuple, list] = {}
    flat = jax.tree_util.tree_leaves_with_path(abstract)
    for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings), strict=True):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        name = re.sub(r"(?<=/)\d+(?=/|$)|^\d+(?=/)", "*", name)
        shard = sh.shard_shape(tuple(leaf.shape)) if leaf.shape else ()
        key = (name, tuple(leaf.shape), str(leaf.dtype), _spec_text(sh.spec))
        nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        if key in rows:
            rows[key][1] += 1
        else:
            rows[key] = [nbytes, 1]
    return [
        [name, "x".join(map(str, shape)) or "()", dtype, spec, human(nbytes), str(count)]
        for (name, shape, dtype, spec), (nbytes, count) in rows.items()
    ]


def activation_bytes(model_cfg, *, batch_per_device: int, seq_len: int, tensor: int) -> int:
    """A rough estimate of the activations one device saves for the backward pass.

    tokens T = batch_per_device x seq_len (one micro-batch), bytes b of the compute dtype,
    H = num_heads, K = num_kv_heads, h = head_dim, F = ffw_dim, t = the tensor-parallel size,
    L = num_layers, W = min(seq_len, sliding window of a local layer; seq_len for global):

      per layer, remat none:          T*b*(4*d + (H + 2K)*h/t + 3*F/t) + T*4*H*W/t
                                       (residual and norm outputs, q/k/v, GeGLU gate/up/product,
                                        float32 attention probabilities)
      per layer, remat save_matmuls:  T*b*(2*d + (H + 2K)*h/t + 2*F/t)
      per layer, remat full:          T*b*d   (the layer input; one layer is recomputed at a time,
                                        whose 'none' activations are added once)
      plus the logits: T*4*vocab/t*2 (float32 logits and their gradient)

    Real usage also depends on XLA's buffer reuse and fusion; expect this within ~2x.
    """
    t = max(tensor, 1)
    T = batch_per_device * seq_len
    b = np.dtype(model_cfg.compute_dtype).itemsize
    d, H, K, h, F = (
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.head_dim,
        model_cfg.ffw_dim,
    )
    window = getattr(model_cfg, "sliding_window", None) or seq_len
    kinds = tuple(model_cfg.layer_kinds)

    def full_layer(kind: str) -> float:
        W = {"global": seq_len, "local": min(seq_len, window)}.get(kind, 0)  # recurrent: none
        return T * b * (4 * d + (H + 2 * K) * h / t + 3 * F / t) + T * 4 * H * W / t

    if model_cfg.remat == "none":
        layers = sum(full_layer(k) for k in kinds)
    elif model_cfg.remat == "save_matmuls":
        layers = len(kinds) * T * b * (2 * d + (H + 2 * K) * h / t + 2 * F / t)
    else:
        layers = len(kinds) * T * b * d + max(full_layer(k) for k in kinds)
    logits = T * 4 * model_cfg.vocab_size / t * 2
    return int(layers + logits)


def estimate(model_cfg, stage, *, mesh, rules) -> tuple[MemoryEstimate, list[list[str]]]:
    """(memory per device, parameter table rows) of a training stage on `mesh`."""
    from train.loop import abstract_params
    from train.mesh import data_parallel_size, like_params_shardings
    from train.optim import build_optimizer

    _, abstract, shardings = abstract_params(model_cfg, mesh=mesh, rules=rules)
    params = per_device_bytes(abstract, shardings)
    optimizer = 0
    optim = getattr(stage, "optim", None)
    if optim is not None:
        tx = build_optimizer(optim, total_steps=stage.steps)
        opt_abstract = jax.eval_shape(tx.init, abstract)
        opt_shardings = like_params_shardings(opt_abstract, params=abstract, shardings=shardings)
        optimizer = per_device_bytes(opt_abstract, opt_shardings)
    acts = None
    data = getattr(stage, "data", None)
    if data is not None and hasattr(data, "seq_len"):
        accum = optim.grad_accum if optim is not None else 1
        per_device = max(data.batch_size // data_parallel_size(mesh) // accum, 1)
        acts = activation_bytes(
            model_cfg,
            batch_per_device=per_device,
            seq_len=data.seq_len,
            tensor=mesh.shape["tensor"],
        )
    return MemoryEstimate(params=params, grads=params, optimizer=optimizer, activations=acts), (
        parameter_rows(abstract, shardings)
    )


def describe_memory(cfg) -> str:
    """The parameter sharding table of each trained model and a memory line per stage."""
    from train.mesh import make_mesh

    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.logical_rules()
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    out = [f"mesh: {shape} over {mesh.size} devices ({jax.process_count()} process(es))"]
    tables_done: set[str] = set()
    for name in cfg.order:
        st = cfg.stages[name]
        model = getattr(st, "model", None)
        if not isinstance(model, str) or model not in cfg.models or not hasattr(st, "optim"):
            continue  # not a training stage (e.g. merge)
        est, rows = estimate(cfg.models[model], st, mesh=mesh, rules=rules)
        if model not in tables_done:
            tables_done.add(model)
            out.append(f"\nparameters of model {model!r} (per device = one device's shard):")
            out.append(
                format_table(rows, ["parameter", "shape", "dtype", "spec", "per device", "count"])
            )
        acts = (
            "activations not estimated (rollout batches)"
            if est.activations is None
            else f"activations {human(est.activations)} (estimate)"
        )
        out.append(
            f"memory per device, stage {name!r} ({model}): params {human(est.params)} + grads "
            f"{human(est.grads)} + optimizer {human(est.optimizer)} + {acts} = {human(est.total)}"
        )
    return "\n".join(out)
