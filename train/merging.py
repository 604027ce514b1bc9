"""Weight merging: pure functions on pytrees of arrays (jax or numpy).

    merged = average(trees=[rm_a, rm_b, rm_c])                    # WARM, model soups
    merged = slerp(base=sft, a=policy_a, b=policy_b, t=0.5)         # WARP, two policies
    merged = slerp_many(base=sft, trees=[p1, p2, p3])               # WARP, M policies
    final = liti(base=sft, merged=merged, eta=0.3)                  # WARP's LITI

Every leaf is computed in float32 and cast back to its own dtype (a bfloat16 leaf stays
bfloat16); a numpy leaf comes back as numpy, a jax leaf as jax (on the same devices). All trees
must have the same structure, shapes and floating dtypes (`check_same_structure`, which names
the tree and the leaf that differ).

A *task vector* is a fine-tuned model minus its init, `delta = theta - base`.

SLERP (WARP, arXiv 2406.16768) is applied to the raw task vectors, with the formula as
written and no renormalisation:

    slerp(x, y, t) = sin((1 - t) W) / sin W * x + sin(t W) / sin W * y,   W = angle(x, y)

For task vectors of equal norm the result keeps that norm (where the plain average of two
orthogonal ones shrinks it by 1/sqrt(2)), which is the point of WARP's choice; for unequal norms
the result is not rescaled, so the longer vector pulls the direction its way. Where W is 0 (or
pi, or a task vector is zero) the angle is undefined and we fall back to linear interpolation
`(1 - t) x + t y`. `per_tensor=True` takes one angle per leaf (WARP merges per layer);
`per_tensor=False` one angle for the whole flattened vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["average", "check_same_structure", "liti", "slerp", "slerp_many", "task_vector_stats"]


# ---------------------------------------------------------------------------------------------
# structure


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_same_structure(trees: Sequence[Any], names: Sequence[str]) -> None:
    """Raise ValueError unless every tree has the first one's leaves (paths), shapes and dtypes,
    all floating. The message names the tree and the leaf path of each difference."""
    if len(trees) != len(names):
        raise ValueError(f"{len(trees)} trees but {len(names)} names")
    flats = [_flat(t) for t in trees]
    ref, ref_name = flats[0], names[0]
    problems = []
    for path, leaf in ref.items():
        dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{ref_name}: leaf {path} has dtype {dtype}, not a floating type")
    for flat, name in zip(flats[1:], names[1:], strict=True):
        missing = [p for p in ref if p not in flat]
        extra = [p for p in flat if p not in ref]
        problems += [f"{name}: leaf {p} is missing (it is in {ref_name})" for p in missing]
        problems += [f"{name}: leaf {p} is not in {ref_name}" for p in extra]
        for path, leaf in flat.items():
            if path not in ref:
                continue
            want = ref[path]
            if np.shape(leaf) != np.shape(want):
                problems.append(
                    f"{name}: leaf {path} has shape {tuple(np.shape(leaf))}, "
                    f"{ref_name} has {tuple(np.shape(want))}"
                )
            elif np.dtype(leaf.dtype) != np.dtype(want.dtype):
                problems.append(
                    f"{name}: leaf {path} has dtype {leaf.dtype}, {ref_name} has {want.dtype}"
                )
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError("trees do not match: " + "; ".join(problems[:10]) + more)


# ---------------------------------------------------------------------------------------------
# helpers


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _like(out: jax.Array, ref) -> Any:
    """`out` in `ref`'s dtype, and as numpy if `ref` was numpy."""
    out = out.astype(ref.dtype)
    return np.asarray(out) if isinstance(ref, np.ndarray) else out


def _sq(x) -> jax.Array:
    x = _f32(x).ravel()
    return jnp.vdot(x, x)


def _dot(x, y) -> jax.Array:
    return jnp.vdot(_f32(x).ravel(), _f32(y).ravel())


def _deltas(base, tree):
    return jax.tree.map(lambda x, b: _f32(x) - _f32(b), tree, base)


def _pair_stats(x, y, *, per_tensor: bool):
    """Per leaf (or one global value broadcast to every leaf): <x, y>, |x|^2, |y|^2."""
    dots = jax.tree.map(_dot, x, y)
    xx = jax.tree.map(_sq, x)
    yy = jax.tree.map(_sq, y)
    if not per_tensor:
        dots, xx, yy = _broadcast_total(dots), _broadcast_total(xx), _broadcast_total(yy)
    return dots, xx, yy


def _broadcast_total(stats):
    """Every leaf replaced by the sum over all leaves (one value for the whole vector)."""
    total = sum(jax.tree.leaves(stats))
    return jax.tree.map(lambda _: total, stats)


def _angle(dot, xx, yy):
    """Angle between two vectors from their dot product and squared norms; 0 when either is
    zero (the fall-back to linear interpolation then applies)."""
    denom = jnp.sqrt(xx * yy)
    cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 1.0)
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def _slerp_coeffs(omega, t, eps):
    """(c_x, c_y) of slerp(x, y, t) = c_x x + c_y y; linear where sin(omega) <= eps."""
    s = jnp.sin(omega)
    ok = s > eps
    safe = jnp.where(ok, s, 1.0)
    cx = jnp.where(ok, jnp.sin((1.0 - t) * omega) / safe, 1.0 - t)
    cy = jnp.where(ok, jnp.sin(t * omega) / safe, t)
    return cx, cy


# ---------------------------------------------------------------------------------------------
# merges


def average(*, trees: Sequence[Any], weights: Sequence[float] | None = None):
    """Weighted mean of `trees` (WARM: reward models fine-tuned from one init; model soups).

    `weights` are normalised to sum to 1; None means uniform. Negative weights are refused.
    """
    if not trees:
        raise ValueError("average needs at least one tree")
    if weights is None:
        weights = [1.0] * len(trees)
    if len(weights) != len(trees):
        raise ValueError(f"{len(weights)} weights for {len(trees)} trees")
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    w = (w / w.sum()).astype(np.float32)
    check_same_structure(trees, [f"trees[{i}]" for i in range(len(trees))])

    def mean(ref, *leaves):
        acc = sum(float(wi) * _f32(x) for wi, x in zip(w, (ref, *leaves), strict=True))
        return _like(acc, ref)

    return jax.tree.map(mean, trees[0], *trees[1:])


def slerp(*, base, a, b, t: float, per_tensor: bool = True, eps: float = 1e-8):
    """base + slerp(a - base, b - base, t): spherical interpolation of two task vectors (WARP).

    t=0 gives a, t=1 gives b. The formula is applied to the raw task vectors (see the module
    docstring): their norms are not renormalised. Where the angle is ~0 or ~pi (sin < eps) or a
    task vector is zero, linear interpolation of the task vectors is used instead.
    """
    check_same_structure([base, a, b], ["base", "a", "b"])
    da, db = _deltas(base, a), _deltas(base, b)
    dots, aa, bb = _pair_stats(da, db, per_tensor=per_tensor)

    def leaf(b0, x, y, dot, xx, yy):
        cx, cy = _slerp_coeffs(_angle(dot, xx, yy), t, eps)
        return _like(_f32(b0) + cx * x + cy * y, b0)

    return jax.tree.map(leaf, base, da, db, dots, aa, bb)


def slerp_many(*, base, trees: Sequence[Any], per_tensor: bool = True, eps: float = 1e-8):
    """Merge M >= 2 task vectors by iterated slerp, each contributing equally.

    acc = delta_1; for k = 1 .. M-1: acc = slerp(acc, delta_{k+1}, t_k). The naive t_k = 1/(k+1)
    is equal weighting for linear averaging but not on the sphere (three orthogonal unit
    vectors would come out as [0.61, 0.61, 0.5]), so t_k is the fraction of the angle between
    acc and delta_{k+1} at which the direction of u_1 + ... + u_{k+1} lies (u_i the unit task
    vectors): with W the angle and |S_k| = |u_1 + ... + u_k| (tracked as a scalar),

        t_k = atan2(sin W, |S_k| + cos W) / W,

    which is 1/2 for k = 1 (so M = 2 equals `slerp(t=0.5)`) and tends to 1/(k+1) as W -> 0.
    For task vectors of equal norm r the result is r * (sum of u_i) / |sum of u_i|: independent
    of order and symmetric. Unequal norms are not renormalised (as in `slerp`), so there the
    order matters a little.
    """
    if len(trees) < 2:
        raise ValueError(f"slerp_many needs at least 2 trees, got {len(trees)}")
    check_same_structure([base, *trees], ["base", *(f"trees[{i}]" for i in range(len(trees)))])
    acc = _deltas(base, trees[0])
    s_norm = jax.tree.map(lambda _: jnp.float32(1.0), acc)  # |u_1 + ... + u_k|, per leaf
    for tree in trees[1:]:
        d = _deltas(base, tree)
        dots, xx, yy = _pair_stats(acc, d, per_tensor=per_tensor)

        def step(x, y, dot, xx_, yy_, s):
            omega = _angle(dot, xx_, yy_)
            phi = jnp.arctan2(jnp.sin(omega), s + jnp.cos(omega))
            t = jnp.where(omega > 0, phi / jnp.where(omega > 0, omega, 1.0), 1.0 / (1.0 + s))
            cx, cy = _slerp_coeffs(omega, t, eps)
            s_next = jnp.sqrt(s * s + 2.0 * s * jnp.cos(omega) + 1.0)
            return cx * x + cy * y, s_next

        out = jax.tree.map(step, acc, d, dots, xx, yy, s_norm)
        is_pair = lambda n: isinstance(n, tuple) and len(n) == 2  # noqa: E731
        acc = jax.tree.map(lambda p: p[0], out, is_leaf=is_pair)
        s_norm = jax.tree.map(lambda p: p[1], out, is_leaf=is_pair)
    return jax.tree.map(lambda b0, x: _like(_f32(b0) + x, b0), base, acc)


def liti(*, base, merged, eta: float):
    """LITI (WARP): base + eta * (merged - base). eta=1 keeps the merge, eta=0 returns base."""
    check_same_structure([base, merged], ["base", "merged"])
    return jax.tree.map(
        lambda b0, m: _like(_f32(b0) + eta * (_f32(m) - _f32(b0)), b0), base, merged
    )


def task_vector_stats(*, base, trees: Sequence[Any], names: Sequence[str]) -> dict[str, float]:
    """Cheap scalars for a report: the global norm of each task vector and the cosine between
    each pair (over the whole flattened vector)."""
    deltas = [_deltas(base, t) for t in trees]
    sq = [float(sum(jax.tree.leaves(jax.tree.map(_sq, d)))) for d in deltas]
    out = {f"task_norm/{n}": float(np.sqrt(s)) for n, s in zip(names, sq, strict=True)}
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = float(sum(jax.tree.leaves(jax.tree.map(_dot, deltas[i], deltas[j]))))
            denom = np.sqrt(sq[i] * sq[j])
            out[f"task_cos/{names[i]}/{names[j]}"] = dot / denom if denom > 0 else 0.0
    return out
