"""Building blocks shared by every Gemma-family decoder: RMSNorm, RoPE, attention, GeGLU MLP.

Every parameter carries logical axis names in its `axes` metadata (`vocab`, `embed`, `heads`,
`kv`, `head_dim`, `mlp`, ...); `train/mesh.py` maps them to mesh axes. Parameters are stored in
`param_dtype` and cast to the compute dtype at use; norms, softmax and RoPE run in float32.
The numerics follow Hugging Face transformers (the checkpoints users bring); see
`../shared/design/gemma.md` for the reference facts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.config import ModelConfig

NEG_INF = -2.3819763e38  # most negative bf16-representable float; never produces NaN in softmax


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


@jax.custom_vjp
def _materialize_cotangent(x: jax.Array) -> jax.Array:
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    # Adding 0 at one index is an identity XLA does not simplify, and a scatter is never fused
    # into its consumers: g is written once, in its own layout (see `project`).
    return (g.at[(0,) * g.ndim].add(jnp.zeros((), g.dtype)),)


_materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def project(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(equation, x, w) for a layer's projection; on CPU its cotangent is materialised.

    Why: for the weight gradient dW = x^T g, which contracts over tokens, XLA:CPU lays out
    g [tokens, features] transposed, and it fuses that transpose into the elementwise backward
    that produces g (the GeGLU derivative, the norm's), beside the untransposed copy the input
    gradient reads. Such a loop reading several inputs in transposed order is slow: a GeGLU
    MLP's forward + backward at 2048 tokens x 1024 features takes 115 ms on 2 cores, 60 ms
    when g is written once and transposed by a plain copy. Numerics are unchanged
    (the materialisation adds 0 at one index). GPUs and TPUs read transposed operands natively,
    so there it is a plain einsum.
    """
    y = jnp.einsum(equation, x, w)
    return _materialize_cotangent(y) if jax.default_backend() == "cpu" else y


def make_param(rngs: nnx.Rngs, init, shape, dtype, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter with its logical axis names (one name per dimension).

    Drawn in float32 and then cast, so that the same seed gives the same weights (up to
    rounding) in every param_dtype.
    """
    assert len(axes) == len(shape), (axes, shape)
    return nnx.Param(init(rngs.params(), shape, jnp.float32).astype(dtype), axes=axes)


def fan_in_init(in_axes: tuple[int, ...]):
    """Truncated normal, variance 1/fan_in; fan_in spans `in_axes` (e.g. heads and head_dim)."""
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=-1
    )


def param_axes(state) -> dict:
    """Logical axes of every parameter, with `layers` prepended for scanned (stacked) ones.

    Stacked parameters keep the axes of one layer in their metadata; the extra leading
    dimension is recognised by the rank mismatch.
    """

    def axes(v):
        names = tuple(v.get_metadata()["axes"])
        extra = len(v.get_value().shape) - len(names)
        return ("layers",) * extra + names

    return jax.tree.map(axes, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


class RMSNorm(nnx.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32, w initialised to 0."""

    def __init__(self, dim: int, *, cfg: ModelConfig, rngs: nnx.Rngs, axis_name: str = "embed"):
        self.eps = cfg.norm_eps
        self.scale = make_param(
            rngs, jax.nn.initializers.zeros, (dim,), dtype_of(cfg.param_dtype), (axis_name,)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_angles(positions: jax.Array, *, rope_dim: int, base: float, scale: float) -> jax.Array:
    """Angles [batch, seq, rope_dim/2] = (pos / scale) / base^(2i/rope_dim), in float32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
    return positions.astype(jnp.float32)[..., None] * (inv_freq / scale)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate split halves of the first 2*angles.shape[-1] features of x [b, t, heads, head_dim]."""
    rot = 2 * angles.shape[-1]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def attention_mask(
    *,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array,
    k_seg: jax.Array,
    window: int | None,
) -> jax.Array:
    """Boolean [batch, q, k]: same non-zero segment, causal by position, within the window.

    Positions restart at 0 in each packed segment, so causality and the window are expressed
    on positions together with the segment test; a window of W keeps W keys including self.
    """
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = same & (diff >= 0)
    if window is not None:
        mask &= diff < window
    return mask


def dot_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None,
) -> jax.Array:
    """Grouped-query attention. q [b,t,H,d] (already scaled), k/v [b,s,K,d], mask [b,t,s]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query with no visible key (padding) gets zeros, not a uniform average of garbage.
    probs = jnp.where(mask[:, None, None, :, :], probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    """Multi-, grouped- or multi-query attention with the Gemma/Griffin options.

    `kind` is 'global' or 'local' (sliding window). Options come from the config: QK-norm (Gemma
    3), attention soft-cap (Gemma 2), partial RoPE and an output bias (Griffin).
    """

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kind = kind
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = dtype_of(cfg.param_dtype)
        self.q = make_param(rngs, fan_in_init((0,)), (d, h, hd), pd, ("embed", "heads", "head_dim"))
        self.k = make_param(rngs, fan_in_init((0,)), (d, kvh, hd), pd, ("embed", "kv", "head_dim"))
        self.v = make_param(rngs, fan_in_init((0,)), (d, kvh, hd), pd, ("embed", "kv", "head_dim"))
        self.o = make_param(
            rngs, fan_in_init((0, 1)), (h, hd, d), pd, ("heads", "head_dim", "embed")
        )
        self.o_bias = (
            make_param(rngs, jax.nn.initializers.zeros, (d,), pd, ("embed",))
            if cfg.biases
            else None
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg=cfg, rngs=rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(hd, cfg=cfg, rngs=rngs, axis_name="head_dim")
        else:
            self.q_norm = self.k_norm = None

    @property
    def window(self) -> int | None:
        return self.cfg.sliding_window if self.kind == "local" else None

    def cache_len(self, max_len: int) -> int:
        """Local layers keep only their window of keys; global layers keep everything."""
        return min(self.window, max_len) if self.window else max_len

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: dict | None = None,
    ) -> tuple[jax.Array, dict | None]:
        cfg = self.cfg
        cd = x.dtype
        q = project("btd,dhk->bthk", x, self.q[...].astype(cd))
        k = project("btd,dhk->bthk", x, self.k[...].astype(cd))
        v = project("btd,dhk->bthk", x, self.v[...].astype(cd))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_dim = int(cfg.head_dim * cfg.rope_fraction)
        if self.kind == "local":
            base, scale = cfg.rope_local_base, 1.0
        else:
            base, scale = cfg.rope_base, cfg.rope_global_scale
        angles = rope_angles(positions, rope_dim=rope_dim, base=base, scale=scale)
        q = apply_rope(q, angles) * jnp.asarray(cfg.query_scale, cd)
        k = apply_rope(k, angles)

        if cache is None:
            keys, values, k_pos, k_seg = k, v, positions, segment_ids
            new_cache = None
        else:
            # Attend to what the cache holds plus the new tokens, then write the new tokens into
            # their slots (a ring buffer of the window for local layers).
            keys = jnp.concatenate([cache["k"], k], axis=1)
            values = jnp.concatenate([cache["v"], v], axis=1)
            k_pos = jnp.concatenate([cache["pos"], positions], axis=1)
            cache_seg = (cache["pos"] >= 0).astype(segment_ids.dtype)
            k_seg = jnp.concatenate([cache_seg, segment_ids], axis=1)
            new_cache = write_cache(cache, k=k, v=v, positions=positions, segment_ids=segment_ids)

        mask = attention_mask(
            q_pos=positions, k_pos=k_pos, q_seg=segment_ids, k_seg=k_seg, window=self.window
        )
        out = dot_attention(q, keys, values, mask, softcap=cfg.attn_logit_softcap)
        y = project("bthk,hkd->btd", out, self.o[...].astype(cd))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(cd)
        return y, new_cache

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        n = self.cache_len(max_len)
        shape = (batch, n, self.cfg.num_kv_heads, self.cfg.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, n), -1, jnp.int32),
        }


def write_cache(
    cache: dict, *, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array
) -> dict:
    """Store new keys/values at slot `position % cache_len`; padding tokens are dropped.

    Only the last cache_len new tokens can survive, so only those are written: that keeps the
    scatter free of duplicate slots (whose order XLA leaves undefined).
    """
    n = cache["k"].shape[1]
    t = k.shape[1]
    if t > n:
        k, v, positions, segment_ids = k[:, -n:], v[:, -n:], positions[:, -n:], segment_ids[:, -n:]
    valid = (segment_ids != 0) & (positions >= 0)
    slots = jnp.where(valid, positions % n, n)  # n is out of range: mode="drop" skips it
    rows = jnp.arange(k.shape[0])[:, None]
    return {
        "k": cache["k"].at[rows, slots].set(k, mode="drop"),
        "v": cache["v"].at[rows, slots].set(v, mode="drop"),
        "pos": cache["pos"].at[rows, slots].set(positions, mode="drop"),
    }


class MLP(nnx.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)); Griffin adds biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffw_dim
        pd = dtype_of(cfg.param_dtype)
        self.gate = make_param(rngs, fan_in_init((0,)), (d, f), pd, ("embed", "mlp"))
        self.up = make_param(rngs, fan_in_init((0,)), (d, f), pd, ("embed", "mlp"))
        self.down = make_param(rngs, fan_in_init((0,)), (f, d), pd, ("mlp", "embed"))
        if cfg.biases:
            zeros = jax.nn.initializers.zeros
            self.gate_bias = make_param(rngs, zeros, (f,), pd, ("mlp",))
            self.up_bias = make_param(rngs, zeros, (f,), pd, ("mlp",))
            self.down_bias = make_param(rngs, zeros, (d,), pd, ("embed",))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        cd = x.dtype
        gate = project("...d,df->...f", x, self.gate[...].astype(cd))
        up = project("...d,df->...f", x, self.up[...].astype(cd))
        if self.gate_bias is not None:
            gate = gate + self.gate_bias[...].astype(cd)
            up = up + self.up_bias[...].astype(cd)
        h = jax.nn.gelu(gate, approximate=True) * up
        y = project("...f,fd->...d", h, self.down[...].astype(cd))
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(cd)
        return y
