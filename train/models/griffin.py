"""The Griffin recurrent block of RecurrentGemma: causal depthwise conv + RG-LRU.

    y  = gelu_tanh(W_y x + b_y)
    u  = Conv1D_causal_depthwise(W_x x + b_x)         resets where positions restart
    i  = sigmoid(BlockDiag_i(u)),  r = sigmoid(BlockDiag_a(u))
    log a = -8 * r * softplus(Lambda);   h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)
    out = W_o (h * y) + b_o

The state is float32 and of fixed size, which is why sampling memory does not grow with length.
The recurrence runs as an associative scan (parallel over time); a packed segment start sets
a_t = 0 and the normaliser to 1, so nothing leaks across documents. The decoder in
`train/models/gemma.py` uses this block for the 'recurrent' entries of the layer pattern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.config import ModelConfig
from train.models.layers import dtype_of, fan_in_init, make_param

MAX_SQRT_GRADIENT = 1000.0


@jax.custom_vjp
def sqrt_bound_derivative(x: jax.Array) -> jax.Array:
    """sqrt whose derivative is clipped at MAX_SQRT_GRADIENT (bf16 training otherwise NaNs)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    return (g / jnp.sqrt(jnp.maximum(4.0 * x, 1.0 / MAX_SQRT_GRADIENT**2)),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def lambda_init(key, shape, dtype, min_rad: float = 0.9, max_rad: float = 0.999):
    """Lambda such that softplus(Lambda) = -log a with a = sqrt(U[min_rad^2, max_rad^2])."""
    u = jax.random.uniform(key, shape, jnp.float32, min_rad**2, max_rad**2)
    a = jnp.sqrt(u)
    return jnp.log(jnp.expm1(-jnp.log(a))).astype(dtype)


def linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    """h_t = a_t * h_{t-1} + b_t over axis 1, from h0; all float32."""
    b = b.at[:, 0].add(a[:, 0] * h0)

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h


class RecurrentBlock(nnx.Module):
    """Griffin's temporal-mixing block (the 'recurrent' layer kind)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, w, nh = cfg.d_model, cfg.lru_width, cfg.num_heads
        bw = w // nh
        pd = dtype_of(cfg.param_dtype)
        zeros = jax.nn.initializers.zeros
        self.linear_y = make_param(rngs, fan_in_init((0,)), (d, w), pd, ("embed", "lru"))
        self.linear_y_bias = make_param(rngs, zeros, (w,), pd, ("lru",))
        self.linear_x = make_param(rngs, fan_in_init((0,)), (d, w), pd, ("embed", "lru"))
        self.linear_x_bias = make_param(rngs, zeros, (w,), pd, ("lru",))
        self.linear_out = make_param(rngs, fan_in_init((0,)), (w, d), pd, ("lru", "embed"))
        self.linear_out_bias = make_param(rngs, zeros, (d,), pd, ("embed",))
        # conv_w[j] multiplies the input j - (conv_width - 1) steps away (last tap = current).
        self.conv_w = make_param(rngs, fan_in_init((0,)), (cfg.conv_width, w), pd, ("conv", "lru"))
        self.conv_bias = make_param(rngs, zeros, (w,), pd, ("lru",))
        gate_init = fan_in_init((1,))
        gate_axes = ("heads", "lru_block", "lru_block_out")
        self.input_gate = make_param(rngs, gate_init, (nh, bw, bw), pd, gate_axes)
        self.input_gate_bias = make_param(rngs, zeros, (nh, bw), pd, ("heads", "lru_block"))
        self.a_gate = make_param(rngs, gate_init, (nh, bw, bw), pd, gate_axes)
        self.a_gate_bias = make_param(rngs, zeros, (nh, bw), pd, ("heads", "lru_block"))
        self.a_param = make_param(rngs, lambda_init, (w,), pd, ("lru",))

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: dict | None = None,
    ) -> tuple[jax.Array, dict | None]:
        del segment_ids  # segment starts are where positions restart at 0
        cfg = self.cfg
        cd = x.dtype
        b, t, _ = x.shape
        y = jax.nn.gelu(
            x @ self.linear_y[...].astype(cd) + self.linear_y_bias[...].astype(cd),
            approximate=True,
        )
        u = x @ self.linear_x[...].astype(cd) + self.linear_x_bias[...].astype(cd)

        # Causal depthwise conv over [previous inputs, new inputs]; tap i (i steps back) is used
        # only while it stays inside the current segment (position >= i).
        cw = cfg.conv_width
        prev = cache["conv"] if cache is not None else jnp.zeros((b, cw - 1, u.shape[-1]), cd)
        xx = jnp.concatenate([prev.astype(cd), u], axis=1)
        conv_w = self.conv_w[...].astype(cd)
        conv = jnp.broadcast_to(self.conv_bias[...].astype(cd), u.shape)
        for i in range(cw):
            tap = xx[:, cw - 1 - i : cw - 1 - i + t] * conv_w[cw - 1 - i]
            conv = conv + jnp.where((positions >= i)[..., None], tap, 0)
        u = conv

        # RG-LRU, gates and recurrence in float32.
        nh = cfg.num_heads
        uf = u.astype(jnp.float32)
        ub = uf.reshape(b, t, nh, -1)
        gate_i = jax.nn.sigmoid(
            jnp.einsum("bthi,hij->bthj", ub, self.input_gate[...].astype(jnp.float32))
            + self.input_gate_bias[...].astype(jnp.float32)
        ).reshape(b, t, -1)
        gate_a = jax.nn.sigmoid(
            jnp.einsum("bthi,hij->bthj", ub, self.a_gate[...].astype(jnp.float32))
            + self.a_gate_bias[...].astype(jnp.float32)
        ).reshape(b, t, -1)
        log_a = -8.0 * gate_a * jax.nn.softplus(self.a_param[...].astype(jnp.float32))
        a = jnp.exp(log_a)
        reset = (positions <= 0)[..., None]
        multiplier = jnp.where(reset, 1.0, sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a)))
        normed = uf * gate_i * multiplier
        a = jnp.where(reset, 0.0, a)
        h0 = cache["h"] if cache is not None else jnp.zeros((b, u.shape[-1]), jnp.float32)
        h = linear_scan(a, normed, h0)

        out = (h.astype(cd) * y) @ self.linear_out[...].astype(cd)
        out = out + self.linear_out_bias[...].astype(cd)
        new_cache = None
        if cache is not None:
            new_cache = {"conv": xx[:, -(cw - 1) :].astype(cache["conv"].dtype), "h": h[:, -1]}
        return out, new_cache

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        del max_len  # fixed-size state: the point of Griffin
        w = self.cfg.lru_width
        return {
            "conv": jnp.zeros((batch, self.cfg.conv_width - 1, w), dtype),
            "h": jnp.zeros((batch, w), jnp.float32),
        }
