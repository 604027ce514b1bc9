"""Batched autoregressive sampling from a Gemma-family decoder (`train/models/gemma.py`).

Used by teacher logit sampling, RL rollouts and evaluation. Prompts of different lengths are
left-padded: pad tokens get position -1 and segment 0, so they are never written to the KV cache
and they reset Griffin's recurrence, and every row's last prompt token sits in the same column.
One forward call prefills the cache; a `jax.lax.while_loop` then decodes one token per step
inside the same jitted function (no per-token Python dispatch) and stops as soon as every row
has emitted a stop token. The cache holds `prompt width + max_new_tokens` positions.

Usage:
    out = sample(model, [[2, 651, 6037], [2, 1841]], max_new_tokens=32, rng=jax.random.key(0),
                 temperature=0.8, top_p=0.95, stop_tokens=(1,))
    out.tokens     # int32 [batch, max_new_tokens], pad_id after the first stop token
    out.logprobs   # float32 [batch, max_new_tokens], log p_model(token): raw, untempered logits
    out.lengths    # int32 [batch], tokens up to and including the first stop token

A new program is compiled per batch size, prompt width, `max_new_tokens`, `top_k`, and whether
greedy / top-p / return_logits are on; temperature, top_p, stop tokens (up to 8) and pad_id are
runtime values. Pass `max_prompt_len` to pad every call to one width and so compile once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class SampleOutput(NamedTuple):
    """What `sample` returns. Entries after a row's first stop token are pad_id / 0."""

    tokens: jax.Array  # int32 [batch, max_new_tokens]
    # log_softmax of the model's raw logits at each sampled token: what a policy-gradient or
    # distillation loss recomputes with a plain forward pass, whatever the sampling settings.
    logprobs: jax.Array  # float32 [batch, max_new_tokens]
    # Log-prob under the distribution actually sampled from (tempered, top-k/top-p filtered):
    # the behaviour policy for importance weights. 0 under greedy (a point mass).
    sampling_logprobs: jax.Array  # float32 [batch, max_new_tokens]
    lengths: jax.Array  # int32 [batch]: generated tokens, including the first stop token
    done: jax.Array  # bool [batch]: the row emitted a stop token (else it hit max_new_tokens)
    logits: jax.Array | None = None  # float32 [batch, max_new_tokens, vocab], return_logits only

    @property
    def mask(self) -> jax.Array:
        """bool [batch, max_new_tokens]: the generated tokens that count (up to the stop)."""
        return jnp.arange(self.tokens.shape[1]) < self.lengths[:, None]


def check_sampling_args(
    *, temperature: float, top_k: int | None, top_p: float | None, greedy: bool
) -> None:
    """Raise ValueError for settings that would silently sample something else."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 unless greedy=True, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Logits of the sampling distribution, float32 [..., vocab]: logits / temperature, then
    tokens outside the top_k and outside the nucleus set to -inf (applied in that order, as in
    Hugging Face generate).

    The nucleus is the smallest set of most probable tokens whose probability sums to >= top_p;
    the most probable token is always kept. Ties are broken by index (lower first), so exactly
    top_k tokens survive the top-k filter.
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = x.shape[-1]
    if top_k is not None and top_k < vocab:
        _, idx = jax.lax.top_k(x, top_k)
        keep = jnp.put_along_axis(jnp.zeros(x.shape, bool), idx, True, axis=-1, inplace=False)
        x = jnp.where(keep, x, -jnp.inf)
    if top_p is not None:
        order = jnp.argsort(-x, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        # Mass strictly before each token in sorted order; a token is in the nucleus while the
        # tokens before it have not yet reached top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        before = before.at[..., 0].set(0.0)
        keep_sorted = before < jnp.asarray(top_p, jnp.float32)
        keep = jnp.put_along_axis(
            jnp.zeros(x.shape, bool), order, keep_sorted, axis=-1, inplace=False
        )
        x = jnp.where(keep, x, -jnp.inf)
    return x


def sample_logits(
    logits: jax.Array,
    *,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One token per row of logits [batch, vocab] -> (tokens int32 [batch], sampling log-prob
    float32 [batch]).

    Row r draws with `fold_in(rng, r)`, so a row's sample does not depend on the batch size
    it was drawn in. Greedy is the argmax of the raw logits (log-prob 0: a point mass).
    """
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(x.shape[0]))
    tokens = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)
    return tokens, logp[:, 0]


def sample(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    prompt_lengths: Sequence[int] | np.ndarray | jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    max_prompt_len: int | None = None,
    return_logits: bool = False,
) -> SampleOutput:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: a list of token lists (any lengths, none empty), or an int array [batch, width]
    holding each prompt at the start of its row (right-padded), with `prompt_lengths` [batch]
    (default: the full width). max_prompt_len: pad prompts to this width so that calls with
    different prompt lengths share one compiled program; a longer prompt is an error.
    greedy: argmax of the raw logits; temperature, top_k and top_p are then ignored.
    stop_tokens: a row is done after emitting one of these; its later tokens are pad_id.
    return_logits: also return the raw logits of every step (float32 [batch, steps, vocab];
    memory-heavy, meant for tests and teacher-logit dumps).
    """
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, lengths = _right_padded(
        prompts, prompt_lengths, pad_id=pad_id, max_prompt_len=max_prompt_len
    )
    graphdef, state = nnx.split(model)
    return _generate(
        state,
        tokens,
        lengths,
        rng,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        _stop_array(stop_tokens),
        jnp.asarray(pad_id, jnp.int32),
        graphdef=graphdef,
        max_new_tokens=int(max_new_tokens),
        top_k=None if top_k is None else int(top_k),
        use_top_p=top_p is not None,
        greedy=bool(greedy),
        return_logits=bool(return_logits),
    )


def _stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop tokens padded with -1 (never sampled) to a multiple of 8, so that changing them does
    not recompile."""
    stops = [int(t) for t in stop_tokens]
    if any(t < 0 for t in stops):
        raise ValueError(f"stop tokens must be non-negative token ids, got {stops}")
    width = max(8, -(-len(stops) // 8) * 8)
    return jnp.asarray(stops + [-1] * (width - len(stops)), jnp.int32)


def _right_padded(prompts, prompt_lengths, *, pad_id, max_prompt_len):
    """Host-side validation; returns (int32 [batch, width] right-padded, int32 [batch])."""
    if isinstance(prompts, np.ndarray | jax.Array):
        tokens = np.asarray(prompts)
        if tokens.ndim != 2:
            raise ValueError(f"a prompt array must be [batch, width], got shape {tokens.shape}")
        if prompt_lengths is None:
            lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int64)
        else:
            lengths = np.asarray(prompt_lengths).reshape(-1)
            if lengths.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"prompt_lengths has {lengths.shape[0]} entries for {tokens.shape[0]} prompts"
                )
            if (lengths > tokens.shape[1]).any():
                raise ValueError(f"prompt_lengths exceed the prompt width {tokens.shape[1]}")
    else:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is only for a prompt array, not a list of prompts")
        rows = [list(p) for p in prompts]
        lengths = np.asarray([len(p) for p in rows], np.int64)
        tokens = np.full((len(rows), max(lengths, default=0)), pad_id, np.int64)
        for i, p in enumerate(rows):
            tokens[i, : len(p)] = p
    if tokens.shape[0] == 0:
        raise ValueError("no prompts to sample from")
    if (lengths < 1).any():
        raise ValueError(f"empty prompt at rows {np.flatnonzero(lengths < 1).tolist()}")
    if max_prompt_len is not None:
        if lengths.max() > max_prompt_len:
            raise ValueError(
                f"prompt of {int(lengths.max())} tokens is longer than "
                f"max_prompt_len={max_prompt_len}"
            )
        width = tokens.shape[1]
        if width < max_prompt_len:
            pad = np.full((tokens.shape[0], max_prompt_len - width), pad_id, tokens.dtype)
            tokens = np.concatenate([tokens, pad], axis=1)
        tokens = tokens[:, :max_prompt_len]
    return tokens.astype(np.int32), lengths.astype(np.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "top_k",
        "use_top_p",
        "greedy",
        "return_logits",
    ),
)
def _generate(
    state,
    tokens,
    lengths,
    rng,
    temperature,
    top_p,
    stops,
    pad_id,
    *,
    graphdef,
    max_new_tokens,
    top_k,
    use_top_p,
    greedy,
    return_logits,
) -> SampleOutput:
    """Prefill + while_loop decode, all in one program. tokens: right-padded [batch, width]."""
    model = nnx.merge(graphdef, state)
    b, width = tokens.shape
    n = max_new_tokens
    # Left-align: shift each row right by its padding, so all prompts end in the last column.
    shift = width - lengths
    col = jnp.arange(width, dtype=jnp.int32)[None, :]
    tokens = jnp.take_along_axis(tokens, (col - shift[:, None]) % width, axis=1)
    positions = col - shift[:, None]
    segment_ids = (positions >= 0).astype(jnp.int32)
    positions = jnp.maximum(positions, -1)
    tokens = jnp.where(segment_ids > 0, tokens, pad_id)

    cache = model.init_cache(batch=b, max_len=width + n)
    logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    def choose(step, logits, out):
        """Sample token `step` of every row from its logits [batch, vocab] into `out`."""
        logits = logits.astype(jnp.float32)
        tok, slp = sample_logits(
            logits,
            rng=jax.random.fold_in(rng, step),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else None,
            greedy=greedy,
        )
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)
        live = ~out["done"]
        out = dict(out)
        out["tokens"] = out["tokens"].at[:, step].set(jnp.where(live, tok, pad_id))
        out["logprobs"] = out["logprobs"].at[:, step].set(jnp.where(live, lp[:, 0], 0.0))
        out["sampling_logprobs"] = (
            out["sampling_logprobs"].at[:, step].set(jnp.where(live, slp, 0.0))
        )
        if return_logits:
            out["logits"] = out["logits"].at[:, step].set(logits)
        out["lengths"] = out["lengths"] + live.astype(jnp.int32)
        out["done"] = out["done"] | (live & (tok[:, None] == stops[None, :]).any(-1))
        return out

    out = {
        "tokens": jnp.full((b, n), pad_id, jnp.int32),
        "logprobs": jnp.zeros((b, n), jnp.float32),
        "sampling_logprobs": jnp.zeros((b, n), jnp.float32),
        "lengths": jnp.zeros((b,), jnp.int32),
        "done": jnp.zeros((b,), bool),
    }
    if return_logits:
        out["logits"] = jnp.zeros((b, n, logits.shape[-1]), jnp.float32)
    out = choose(0, logits[:, -1], out)

    def cond(carry):
        step, _, out = carry
        return (step < n) & ~out["done"].all()

    def body(carry):
        # Feed token step-1 (pad for finished rows: harmless, their outputs are masked), then
        # sample token step.
        step, cache, out = carry
        prev = jax.lax.dynamic_index_in_dim(out["tokens"], step - 1, axis=1, keepdims=True)
        pos = (lengths + step - 1)[:, None]
        logits, cache = model(prev, positions=pos, segment_ids=jnp.ones_like(pos), cache=cache)
        return step + 1, cache, choose(step, logits[:, 0], out)

    _, _, out = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), cache, out))
    return SampleOutput(**out)
