"""One decoder for Gemma 1, 2, 3 (text) and RecurrentGemma, driven by `ModelConfig`.

    x = embed(tokens) * sqrt(d_model)                 (scale cast to the compute dtype)
    for each layer (kind from cfg.layer_pattern: global / local attention, or recurrent):
        x += post_norm(temporal(pre_norm(x)))         (post-norms: Gemma 2 and 3)
        x += post_ffw_norm(mlp(pre_ffw_norm(x)))
    logits = softcap(final_norm(x) @ embed^T)         (tied output projection)

Layers are grouped in *units*, one unit per repetition of the layer pattern (6 layers for Gemma
3's 5 local : 1 global). Units are stored stacked (leading `layers` axis) and, with
`scan_layers`, run by one `jax.lax.scan`, so the compiled program holds one unit whatever the
depth; layers left over after the last full unit (26 = 4x6 + 2 for Gemma 3 1B) form the *tail*.
Within a unit each layer's kind is static, so local layers keep a window-sized KV cache and
recurrent layers a fixed state.

Usage:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                                    # [batch, seq, vocab] float32
    cache = model.init_cache(batch=2, max_len=64)
    logits, cache = model(tokens, positions=pos, cache=cache)  # prefill / decode
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.config import LayerKind, ModelConfig
from train.models.griffin import RecurrentBlock
from train.models.layers import MLP, Attention, RMSNorm, dtype_of, make_param

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole unit
    "save_matmuls": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """A residual block: temporal mixing (attention or recurrence), then a GeGLU MLP."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind, *, rngs: nnx.Rngs):
        self.kind = kind
        d = cfg.d_model
        self.pre_norm = RMSNorm(d, cfg=cfg, rngs=rngs)
        if kind == "recurrent":
            self.temporal = RecurrentBlock(cfg, rngs=rngs)
        else:
            self.temporal = Attention(cfg, kind, rngs=rngs)
        self.post_norm = RMSNorm(d, cfg=cfg, rngs=rngs) if cfg.post_norms else None
        self.pre_ffw_norm = RMSNorm(d, cfg=cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_ffw_norm = RMSNorm(d, cfg=cfg, rngs=rngs) if cfg.post_norms else None

    def __call__(self, x, *, positions, segment_ids, cache=None):
        h, cache = self.temporal(
            self.pre_norm(x), positions=positions, segment_ids=segment_ids, cache=cache
        )
        if self.post_norm is not None:
            h = self.post_norm(h)
        x = x + h
        h = self.mlp(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h)
        return x + h, cache


class Unit(nnx.Module):
    """One repetition of the layer pattern (or the shorter tail after the last repetition)."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[LayerKind, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, k, rngs=rngs) for k in kinds])

    def __call__(self, x, *, positions, segment_ids, caches=None):
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=None if caches is None else caches[i],
            )
            new_caches.append(c)
        return x, (None if caches is None else new_caches)


class Transformer(nnx.Module):
    """The Gemma-family decoder. `model(tokens)` returns float32 logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pattern = cfg.layer_pattern
        self.num_units, num_tail = divmod(cfg.num_layers, len(pattern))
        self.embed = make_param(
            rngs,
            jax.nn.initializers.normal(cfg.d_model**-0.5),
            (cfg.vocab_size, cfg.d_model),
            dtype_of(cfg.param_dtype),
            ("vocab", "embed"),
        )
        if self.num_units:

            @nnx.split_rngs(splits=self.num_units)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_units(rngs):
                return Unit(cfg, pattern, rngs=rngs)

            self.units = make_units(rngs)
        else:
            self.units = None
        self.tail = Unit(cfg, pattern[:num_tail], rngs=rngs) if num_tail else None
        self.final_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)

    def layer(self, index: int) -> tuple[str, int, int]:
        """Where layer `index` lives: ('units', unit, slot) or ('tail', 0, slot)."""
        p = len(self.cfg.layer_pattern)
        if index < self.num_units * p:
            return "units", index // p, index % p
        return "tail", 0, index - self.num_units * p

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        cd = dtype_of(self.cfg.compute_dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cd)
        return x * jnp.asarray(self.cfg.embed_scale, cd)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
        return_hidden: bool = False,
    ):
        """Logits [batch, seq, vocab] (float32); with `cache`, also the updated cache.

        tokens: int [batch, seq]. positions: int [batch, seq], restarting at 0 in each packed
        segment (default 0..seq-1). segment_ids: int [batch, seq], 0 marks padding (default 1).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = self.embed_tokens(tokens)
        kw = dict(positions=positions, segment_ids=segment_ids)
        new_cache = {} if cache is not None else None

        if self.units is not None:
            graphdef, stacked = nnx.split(self.units)

            def body(x, unit_state_and_cache):
                unit_state, unit_cache = unit_state_and_cache
                return nnx.merge(graphdef, unit_state)(x, caches=unit_cache, **kw)

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
            unit_caches = None if cache is None else cache["units"]
            if cfg.scan_layers:
                x, unit_caches = jax.lax.scan(body, x, (stacked, unit_caches))
            else:
                outs = []
                for i in range(self.num_units):
                    x, c = body(x, jax.tree.map(lambda a, i=i: a[i], (stacked, unit_caches)))
                    outs.append(c)
                if cache is not None:
                    unit_caches = jax.tree.map(lambda *a: jnp.stack(a), *outs)
            if cache is not None:
                new_cache["units"] = unit_caches
        if self.tail is not None:
            x, tail_cache = self.tail(x, caches=None if cache is None else cache["tail"], **kw)
            if cache is not None:
                new_cache["tail"] = tail_cache

        x = self.final_norm(x)
        if return_hidden:
            return x if cache is None else (x, new_cache)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection (+ final soft-cap), float32 [..., vocab]."""
        emb = self.embed[...].astype(hidden.dtype)
        logits = jnp.einsum("...d,vd->...v", hidden, emb, preferred_element_type=jnp.float32)
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def init_cache(self, *, batch: int, max_len: int, dtype=None) -> dict:
        """An empty decoding cache: window-sized KV for local layers, full-length KV for global
        layers, fixed conv + recurrent state for recurrent layers."""
        dtype = dtype or dtype_of(self.cfg.compute_dtype)
        cache = {}
        if self.units is not None:
            cache["units"] = [
                jax.tree.map(
                    lambda a: jnp.broadcast_to(a, (self.num_units, *a.shape)),
                    block.temporal.init_cache(batch, max_len, dtype),
                )
                for block in self.units.blocks
            ]
        if self.tail is not None:
            cache["tail"] = [
                block.temporal.init_cache(batch, max_len, dtype) for block in self.tail.blocks
            ]
        return cache


def num_params(model: nnx.Module) -> int:
    """Parameter count (works on an abstract model from nnx.eval_shape too)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
