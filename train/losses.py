"""Losses as pure, keyword-only functions returning (loss, metrics). Softmax in float32.

Shapes: logits [batch, seq, vocab], targets and mask [batch, seq]; a teacher's sampled or top-k
outputs are [batch, seq, k] (ids, log-probabilities and a `valid` flag that pads k).

Every loss is the mean over positions where mask is 1. Its metrics carry `tokens` (the mask sum)
and `loss_sum` (the masked sum) because the training loop divides summed losses by the batch's
token count, which keeps gradient accumulation over micro-batches exact.

Distillation (design: recipes.md, "Pretraining by distillation"). p is the teacher, q the
student, both at the loss temperature T: p ∝ exp(teacher_logits / T), q = softmax(s / T).
- `sampled_ce`: Gemma 3's loss on K ids drawn from the teacher: cross-entropy of q (normalised over
  the full vocabulary) against p restricted to the drawn ids and renormalised over them.
- `topk_kl`: KL on the teacher's top-k, either with both sides renormalised over the k ids
  (MaxText) or with the student over the full vocabulary and the teacher's missing mass matched
  to the student's mass outside the top-k (DistillKit).
- `full_kl`: forward KL(p || q), reverse KL(q || p) or generalised JSD(beta) (GKD) over the full
  vocabulary, for a teacher run online.
- `distill_loss`: alpha * one of the above + (1 - alpha) * cross-entropy on the hard labels,
  picked by name from `DISTILL_LOSSES`.
All three scale the loss by T^2 (Hinton et al. 2015): the gradient of a KL between tempered
softmaxes shrinks as 1/T^2, and the factor keeps its size comparable across temperatures and
against the hard-label term. The `kl_to_teacher` metric is the unscaled forward KL(p || q) at T
(against the renormalised target for the sampled and top-k losses).

Memory: the student's float32 logits are the biggest tensor of a step (at Gemma's 262k vocabulary,
1 GiB per 1024 positions). The sparse losses gather the k logits they need (no one-hot tensors).
With `vocab_chunk` set, every full-vocabulary reduction (the log-softmax normaliser, the sums of
`full_kl`) is a `lax.scan` over vocabulary slices of that size, so the forward pass holds slices,
never a [batch, seq, vocab] temporary. (XLA already fuses a lone logsumexp without one, so this
matters most for `full_kl`, whose several sums over two log-softmaxes it does not fuse.) The
backward passes of these reductions are written by hand (`jax.custom_vjp`): one elementwise
expression of the logits and per-position statistics saved by the forward pass, writing the
logits' gradient (the one [batch, seq, vocab] tensor a step must hold) and saving no forward
intermediates. Leave `vocab_chunk=None` when the vocabulary axis is sharded over devices: the
reductions are then local plus one all-reduce, while slicing a sharded axis would gather it.

Post-training (design: recipes.md, "Post-training"). `token_logprobs` gives a policy's float32
log-probabilities of sampled tokens [batch, seq]; `group_advantages` turns rewards [prompts, group]
into advantages (GRPO, RLOO or REINFORCE baselines); `policy_gradient_loss` is the PPO / GRPO
clipped surrogate with a k1 or k3 KL penalty to a reference, normalised per token; `jbond_loss`
distils the Best-of-n distribution of an anchor policy with the Jeffreys divergence (J-BOND), with
`bond_log_cdf` estimating the anchor's reward quantiles on the host; `bradley_terry_loss` trains a
reward model on preference pairs (its `tokens` counts pairs). Sequence-level quantities
(advantages, log-CDFs, pair scores) are constants of the loss: only the policy's log-probabilities
(or the reward model's scores) are differentiated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Stands in for log(0) where a -inf would put 0 * inf = NaN in a gradient; exp of it is exactly 0.
_NEG = -1e30


def next_token_ce(
    *, logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of `targets` under `logits` over positions where mask is 1.

    Uses logsumexp minus the target logit, so no one-hot [batch, seq, vocab] tensor is built.
    Metrics: the loss, next-token accuracy, and the sums behind them (for token-weighted
    averaging across micro-batches, batches and devices).
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - target_logit) * mask
    tokens = mask.sum()
    loss = nll.sum() / jnp.maximum(tokens, 1.0)
    correct = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum()
    return loss, {
        "loss": loss,
        "accuracy": correct / jnp.maximum(tokens, 1.0),
        "tokens": tokens,
        "nll_sum": nll.sum(),
        "correct_sum": correct,
    }


# ---------------------------------------------------------------------------------------------
# Full-vocabulary reductions, optionally over vocabulary chunks


def _check_common(temperature: float, vocab_chunk: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if vocab_chunk is not None and (int(vocab_chunk) != vocab_chunk or vocab_chunk < 1):
        raise ValueError(f"vocab_chunk must be a positive integer or None, got {vocab_chunk}")


def _fold_vocab(body: Callable, carry, arrays: tuple[jax.Array, ...], chunk: int | None):
    """carry = body(carry, *slices) over consecutive [..., chunk] slices of the [..., vocab] arrays.

    A `lax.scan` over `vocab // chunk` dynamic slices, then one static slice for the remainder;
    with chunk None (or >= vocab) a single call on the whole arrays.
    """
    vocab = arrays[0].shape[-1]
    if chunk is None or chunk >= vocab:
        return body(carry, *arrays)
    n, rem = divmod(vocab, chunk)

    def step(c, i):
        parts = [jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=a.ndim - 1) for a in arrays]
        return body(c, *parts), None

    carry, _ = jax.lax.scan(step, carry, jnp.arange(n))
    if rem:
        carry = body(carry, *[a[..., n * chunk :] for a in arrays])
    return carry


def _logsumexp(logits: jax.Array, temperature: float, chunk: int | None) -> jax.Array:
    """float32 [...]: logsumexp(logits / T) over the last axis, as a running logaddexp."""

    def body(acc, part):
        part = part.astype(jnp.float32) / temperature
        return jnp.logaddexp(acc, jax.nn.logsumexp(part, axis=-1))

    init = jnp.full(logits.shape[:-1], -jnp.inf, jnp.float32)
    return _fold_vocab(body, init, (logits,), chunk)


def _scatter_add_last(x: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """x [..., vocab] with values [..., k] added at ids [..., k] (repeated ids accumulate)."""
    vocab, k = x.shape[-1], ids.shape[-1]
    flat = x.reshape(-1, vocab)
    rows = jnp.arange(flat.shape[0])[:, None]
    flat = flat.at[rows, ids.reshape(-1, k)].add(values.reshape(-1, k))
    return flat.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logprobs_at(
    logits: jax.Array, ids: jax.Array, temperature: float, chunk: int | None
) -> jax.Array:
    """float32 [..., k]: log_softmax(logits / T) over the full vocabulary, read at ids [..., k].

    One (chunked) logsumexp plus a gather of k logits. The gradient is written by hand,
    softmax(logits / T) * (-sum_k g_k) / T plus g / T scattered at the ids, in one float32 buffer.
    """
    return _logprobs_at_fwd(logits, ids, temperature, chunk)[0]


def _logprobs_at_fwd(logits, ids, temperature, chunk):
    lse = _logsumexp(logits, temperature, chunk)
    picked = jnp.take_along_axis(logits, ids, axis=-1).astype(jnp.float32) / temperature
    return picked - lse[..., None], (logits, ids, lse)


def _logprobs_at_bwd(temperature, chunk, res, g):
    del chunk
    logits, ids, lse = res
    g = g.astype(jnp.float32) / temperature
    probs = jnp.exp(logits.astype(jnp.float32) / temperature - lse[..., None])
    grad = _scatter_add_last(-probs * g.sum(-1)[..., None], ids, g)
    return grad.astype(logits.dtype), None


_logprobs_at.defvjp(_logprobs_at_fwd, _logprobs_at_bwd)


def _xlogy_diff(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """w * (a - b), and 0 where w == 0 (so 0 * (-inf) is 0, not NaN)."""
    return jnp.where(w > 0, w * (a - b), 0.0)


def _tempered(s, t, lse_s, lse_t, temperature):
    """Student and teacher log-probabilities and probabilities at T on one vocabulary slice."""
    ls = s.astype(jnp.float32) / temperature - lse_s[..., None]
    lt = t.astype(jnp.float32) / temperature - lse_t[..., None]
    return ls, lt, jnp.exp(ls), jnp.exp(lt)


def _mixture_log_ratios(ls, lt, beta):
    """(log p - log m, log q - log m) for m = beta * p + (1 - beta) * q.

    Written in terms of log q - log p rather than as differences with log m: near beta = 0 or 1,
    m is close to q or p, and the difference of two close logs would lose the digits that
    JSD(beta) / beta (or / (1 - beta)) is made of.
    """
    d = ls - lt
    log_b, log_1mb = jnp.log(beta), jnp.log1p(-beta)
    return -jnp.logaddexp(log_b, log_1mb + d), -jnp.logaddexp(log_1mb, log_b - d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _full_divergence(s, t, targets, temperature, divergence, beta, chunk):
    """Per position (divergence, forward KL, hard-label NLL), each float32 [...], between
    q = softmax(s / T) and p = softmax(t / T) over the full vocabulary (see `full_kl`); the NLL
    is -log softmax(s)[targets] at T = 1 (zeros when targets is None).

    The hard-label term lives here rather than in a second `_logprobs_at` because its
    normaliser joins the same pass over the logits, and its gradient joins the same elementwise
    backward, which ends in one scatter of the targets' -1: the student's logits gradient is
    then a single materialised array, so the transpose that XLA:CPU's weight-gradient matmul
    wants is a plain copy (fused into a sum of two vocabulary-sized gradients it read three
    arrays in transposed order, ~10% of an online distillation step).
    """
    return _full_divergence_fwd(s, t, targets, temperature, divergence, beta, chunk)[0]


def _full_divergence_fwd(s, t, targets, temperature, divergence, beta, chunk):
    lead = s.shape[:-1]
    hard = targets is not None
    separate_lse1 = hard and temperature != 1.0

    def normalisers(acc, s_part, t_part):
        parts = [s_part.astype(jnp.float32) / temperature, t_part.astype(jnp.float32) / temperature]
        if separate_lse1:
            parts.append(s_part.astype(jnp.float32))
        return tuple(
            jnp.logaddexp(a, jax.nn.logsumexp(x, axis=-1)) for a, x in zip(acc, parts, strict=True)
        )

    neg_inf = jnp.full(lead, -jnp.inf, jnp.float32)
    lses = _fold_vocab(normalisers, (neg_inf,) * (3 if separate_lse1 else 2), (s, t), chunk)
    lse_s, lse_t = lses[:2]
    lse1 = lses[2] if separate_lse1 else lse_s

    def sums(acc, s_part, t_part):
        ls, lt, q, p = _tempered(s_part, t_part, lse_s, lse_t, temperature)
        terms = [_xlogy_diff(p, lt, ls)]  # forward KL
        if divergence == "reverse":
            terms.append(_xlogy_diff(q, ls, lt))
        elif divergence == "jsd":
            p_m, q_m = _mixture_log_ratios(ls, lt, beta)
            terms += [_xlogy_diff(p, p_m, 0.0), _xlogy_diff(q, q_m, 0.0)]
        return tuple(a + x.sum(-1) for a, x in zip(acc, terms, strict=True))

    n_terms = {"forward": 1, "reverse": 2, "jsd": 3}[divergence]
    stats = _fold_vocab(sums, (jnp.zeros(lead, jnp.float32),) * n_terms, (s, t), chunk)
    fkl = stats[0]
    if divergence == "forward":
        div = fkl
    elif divergence == "reverse":
        div = stats[1]
    else:  # JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)
        div = beta * stats[1] + (1.0 - beta) * stats[2]
    if hard:
        picked = jnp.take_along_axis(s, targets[..., None], axis=-1)[..., 0]
        nll = lse1 - picked.astype(jnp.float32)
    else:
        nll = jnp.zeros(lead, jnp.float32)
    return (div, fkl, nll), (s, t, targets, lse_s, lse_t, lse1, stats)


def _full_divergence_bwd(temperature, divergence, beta, chunk, res, cts):
    # d/ds of sum_v q_v f(q)_v goes through the softmax: q * (g - sum_v q g) / T with
    # g = d/dq. Forward KL: g = -p/q. Reverse KL: g = log(q/p) + 1. JSD: g = (1 - beta) log(q/m)
    # (the log m terms' derivatives cancel), and symmetrically beta log(p/m) for the teacher.
    # The hard-label NLL adds softmax(s) - onehot(target), the onehot as the last op (a scatter).
    del chunk
    s, t, targets, lse_s, lse_t, lse1, stats = res
    g_div, g_fkl, g_nll = (c.astype(jnp.float32)[..., None] for c in cts)
    ls, lt, q, p = _tempered(s, t, lse_s, lse_t, temperature)
    fkl = stats[0][..., None]
    g_f = g_fkl + g_div if divergence == "forward" else g_fkl
    ds = (q - p) * g_f
    dt = _xlogy_diff(p, lt, ls + fkl) * g_f
    if divergence == "reverse":
        ds = ds + _xlogy_diff(q, ls, lt + stats[1][..., None]) * g_div
        dt = dt + (p - q) * g_div
    elif divergence == "jsd":
        p_m, q_m = _mixture_log_ratios(ls, lt, beta)
        ds = ds + (1.0 - beta) * _xlogy_diff(q, q_m, stats[2][..., None]) * g_div
        dt = dt + beta * _xlogy_diff(p, p_m, stats[1][..., None]) * g_div
    ds = ds / temperature
    if targets is not None:
        ds = ds + jnp.exp(s.astype(jnp.float32) - lse1[..., None]) * g_nll
        ds = _scatter_add_last(ds, targets[..., None], -g_nll)
    return ds.astype(s.dtype), (dt / temperature).astype(t.dtype), None


_full_divergence.defvjp(_full_divergence_fwd, _full_divergence_bwd)


# ---------------------------------------------------------------------------------------------
# Helpers on the k axis


def _log_normalize(x: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log softmax of x over the entries where keep is True (and x is finite), [..., k].

    Returns (log-probabilities with 0 at dropped entries, the mask of entries kept). Dropped
    entries are replaced by a finite sentinel before the logsumexp, so no NaN reaches a gradient,
    also for a row with nothing kept (its log-probabilities are all dropped).
    """
    keep = keep & (x > -jnp.inf)
    x = jnp.where(keep, x, _NEG)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    return jnp.where(keep, x - lse, 0.0), keep


def _reduce(per_position: jax.Array, kl: jax.Array, mask: jax.Array, scale: float):
    """(loss, metrics) from per-position values [batch, seq]: the masked mean and sums."""
    on = mask.astype(jnp.float32) > 0
    tokens = on.sum().astype(jnp.float32)
    denom = jnp.maximum(tokens, 1.0)
    loss_sum = jnp.where(on, per_position, 0.0).sum() * scale
    kl_sum = jnp.where(on, kl, 0.0).sum()
    loss = loss_sum / denom
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "tokens": tokens,
        "kl_to_teacher": kl_sum / denom,
        "kl_sum": kl_sum,
    }


def _sparse_inputs(ids, teacher_logprobs, valid):
    valid = valid.astype(bool)
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)  # padded slots may hold any id
    return ids, teacher_logprobs.astype(jnp.float32), valid


# ---------------------------------------------------------------------------------------------
# Distillation losses


def sampled_ce(
    *,
    student_logits: jax.Array,
    ids: jax.Array,
    teacher_logprobs: jax.Array,
    valid: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    weights: str = "probs",
    counts: jax.Array | None = None,
    vocab_chunk: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Gemma 3's distillation loss on ids sampled from the teacher.

    Inputs: student_logits [batch, seq, vocab]; ids int32 [batch, seq, k], the distinct ids drawn
    at each position, padded to k; teacher_logprobs [batch, seq, k], the teacher's untempered
    log-probabilities (full-vocabulary log_softmax) at those ids; valid bool [batch, seq, k],
    False on padding (whose ids and log-probabilities are ignored, -inf allowed); mask
    [batch, seq]; counts [batch, seq, k], draws per id, for weights="counts".

    Per position, with S the valid ids, the target is
        weights="probs":  w_i = p(i)^(1/T) / sum_{j in S} p(j)^(1/T)
                         (the teacher at temperature T, zero outside S, renormalised; Gemma 3);
        weights="counts": w_i = counts_i / sum_j counts_j (the empirical distribution of the draws);
    and the loss is T^2 * sum_{i in S} -w_i log q(i), with q = softmax(student_logits / T) over
    the full vocabulary, so the student is also pushed down on every id that was not drawn.

    As the number of draws grows, both targets tend to the teacher and the loss to the full
    cross-entropy sum_v p(v) (-log q(v)). With "counts" the estimate of that cross-entropy (and of
    its gradient) is unbiased at any K, a plain Monte-Carlo average over the draws; "probs" is
    biased (self-normalised) but much less noisy, which is why Gemma 3 uses it. The counts follow
    whatever distribution the sampler drew from, so with "counts" the temperature only tempers
    the student: sample at the temperature you want to distil. A position with no valid id adds 0.
    `kl_to_teacher` is KL(w || q), the cross-entropy minus the target's entropy.
    """
    _check_common(temperature, vocab_chunk)
    ids, teacher_logprobs, valid = _sparse_inputs(ids, teacher_logprobs, valid)
    if weights == "probs":
        log_w, keep = _log_normalize(teacher_logprobs / temperature, valid)
    elif weights == "counts":
        if counts is None:
            raise ValueError('weights="counts" needs counts [batch, seq, k]')
        c = jnp.where(valid, counts.astype(jnp.float32), 0.0)
        keep = c > 0
        log_w, keep = _log_normalize(jnp.log(jnp.where(keep, c, 1.0)), keep)
    else:
        raise ValueError(f'weights must be "probs" or "counts", got {weights!r}')
    w = jnp.where(keep, jnp.exp(log_w), 0.0)
    log_q = _logprobs_at(student_logits, ids, temperature, vocab_chunk)
    ce = jnp.where(keep, -w * log_q, 0.0).sum(-1)
    kl = _xlogy_diff(w, log_w, log_q).sum(-1)
    return _reduce(ce, kl, mask, temperature**2)


def topk_kl(
    *,
    student_logits: jax.Array,
    ids: jax.Array,
    teacher_logprobs: jax.Array,
    valid: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    renormalize: str = "both",
    vocab_chunk: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KL(teacher || student) on the teacher's top-k ids, T^2 * KL at temperature T.

    Inputs as in `sampled_ce`: student_logits [batch, seq, vocab]; ids int32 [batch, seq, k]
    (distinct ids); teacher_logprobs [batch, seq, k], untempered full-vocabulary log-probabilities;
    valid bool [batch, seq, k]; mask [batch, seq].

    renormalize="both" (MaxText): teacher and student are both restricted to the k valid ids and
    renormalised over them, p_i ∝ p(i)^(1/T), q_i ∝ exp(s_i / T), and the loss is the k-bin
    KL(p || q). The student's mass outside the top-k is not seen: it is neither pushed down nor
    needed, and no full-vocabulary pass runs (vocab_chunk is unused).

    renormalize="teacher_only" (DistillKit): the student is q = softmax(s / T) over the full
    vocabulary; the teacher keeps its true probabilities on the top-k, and its missing mass
    1 - sum_{i in S} p(i) is one more bin, matched against the student's mass outside the top-k,
    1 - sum_{i in S} q(i): a (k+1)-bin KL. At T != 1 the teacher's tempered probabilities need
    its normaliser over the whole vocabulary, which top-k outputs do not determine: the missing
    mass is taken as spread evenly over the vocab - k other ids (the maximum-entropy completion),
    whose tempered mass is (vocab - k) (m / (vocab - k))^(1/T). At T = 1 this assumption plays no
    part. The student's outside mass comes from float32 probabilities, so below ~1e-7 it is
    clamped (the bin then gets a large finite log-ratio, with zero gradient through the clamp).

    With k = vocab both conventions are the full forward KL. A position with no valid id adds 0.
    """
    _check_common(temperature, vocab_chunk)
    ids, teacher_logprobs, valid = _sparse_inputs(ids, teacher_logprobs, valid)
    if renormalize == "both":
        log_p, keep = _log_normalize(teacher_logprobs / temperature, valid)
        picked = jnp.take_along_axis(student_logits, ids, axis=-1).astype(jnp.float32)
        log_q, _ = _log_normalize(picked / temperature, valid)
    elif renormalize == "teacher_only":
        vocab = student_logits.shape[-1]
        p_top = jnp.where(valid, jnp.exp(jnp.where(valid, teacher_logprobs, _NEG)), 0.0)
        missing = jnp.maximum(1.0 - p_top.sum(-1, keepdims=True), 0.0)
        others = vocab - valid.sum(-1, keepdims=True).astype(jnp.float32)
        has_tail = (missing > 0) & (others > 0)
        log_missing = jnp.log(jnp.where(has_tail, missing, 1.0))
        log_others = jnp.log(jnp.maximum(others, 1.0))
        tail = log_others + (log_missing - log_others) / temperature
        log_p, keep = _log_normalize(
            jnp.concatenate([teacher_logprobs / temperature, tail], -1),
            jnp.concatenate([valid, has_tail], -1),
        )
        log_q_top = _logprobs_at(student_logits, ids, temperature, vocab_chunk)
        top_mass = jax.nn.logsumexp(jnp.where(valid, log_q_top, _NEG), axis=-1, keepdims=True)
        out_mass = jnp.maximum(-jnp.expm1(top_mass), jnp.finfo(jnp.float32).tiny)
        log_q = jnp.concatenate([log_q_top, jnp.log(out_mass)], -1)
    else:
        raise ValueError(f'renormalize must be "both" or "teacher_only", got {renormalize!r}')
    p = jnp.where(keep, jnp.exp(log_p), 0.0)
    kl = _xlogy_diff(p, log_p, log_q).sum(-1)
    return _reduce(kl, kl, mask, temperature**2)


def full_kl(
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    vocab_chunk: int | None = None,
    hard_targets: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A divergence between teacher and student over the full vocabulary, times T^2.

    Inputs: student_logits and teacher_logits [batch, seq, vocab] (any float dtype; computed in
    float32); mask [batch, seq]. p = softmax(teacher_logits / T), q = softmax(student_logits / T).

    divergence="forward": KL(p || q), mode-covering; the classic distillation loss (Hinton;
        Gemma 2 distils with it, as cross-entropy against p, which differs by p's entropy).
    divergence="reverse": KL(q || p), mode-seeking.
    divergence="jsd": the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2023,
        arXiv:2306.13649, eq. 1), JSD(beta)(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)
        with m = beta p + (1 - beta) q and p the teacher. It is 0 at beta = 0 and 1;
        JSD(beta) / beta -> KL(p || q) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(q || p) as
        beta -> 1, so small beta behaves like forward KL and beta near 1 like reverse KL, up to
        that scale. Requires 0 < beta < 1; use "forward" / "reverse" for the end points.
    Gradients flow to both logits (stop the teacher's yourself if it is frozen).
    With hard_targets int [batch, seq], the metrics also hold `nll_sum`, the masked sum of the
    student's cross-entropy on them at T = 1, computed in the same passes (`distill_loss` mixes
    it in for alpha < 1).
    """
    _check_common(temperature, vocab_chunk)
    if divergence not in ("forward", "reverse", "jsd"):
        raise ValueError(f'divergence must be "forward", "reverse" or "jsd", got {divergence!r}')
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {student_logits.shape} {teacher_logits.shape}")
    targets = None if hard_targets is None else hard_targets.astype(jnp.int32)
    div, fkl, nll = _full_divergence(
        student_logits,
        teacher_logits,
        targets,
        float(temperature),
        divergence,
        float(beta),
        vocab_chunk,
    )
    loss, metrics = _reduce(div, fkl, mask, temperature**2)
    if targets is not None:
        metrics["nll_sum"] = jnp.where(mask.astype(jnp.float32) > 0, nll, 0.0).sum()
    return loss, metrics


DISTILL_LOSSES: dict[str, Callable[..., tuple[jax.Array, dict[str, jax.Array]]]] = {
    "sampled_ce": sampled_ce,
    "topk_kl": topk_kl,
    "full_kl": full_kl,
}


def distill_loss(
    *,
    kind: str,
    alpha: float,
    student_logits: jax.Array,
    mask: jax.Array,
    hard_targets: jax.Array | None = None,
    temperature: float = 1.0,
    vocab_chunk: int | None = None,
    **teacher,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """alpha * DISTILL_LOSSES[kind](...) + (1 - alpha) * cross-entropy on the hard labels.

    student_logits [batch, seq, vocab], mask [batch, seq], hard_targets int [batch, seq] (needed
    when alpha < 1); `teacher` holds the named loss's other arguments (ids, teacher_logprobs,
    valid, ... or teacher_logits, divergence, beta). The temperature tempers only the distillation
    term (with its T^2 factor); the hard-label term is the plain cross-entropy at T = 1, as in
    Hinton et al. Gemma's recipe is alpha = 1, T = 1; Tunix's defaults are alpha = 0.5, T = 2.

    Metrics: loss, loss_sum, tokens, the distillation term (distill, distill_sum, kl_to_teacher,
    kl_sum) and, when alpha < 1, the hard-label term (ce, ce_sum).
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; known: {sorted(DISTILL_LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and hard_targets is None:
        raise ValueError("alpha < 1 needs hard_targets [batch, seq]")
    fused_ce = kind == "full_kl" and alpha < 1.0  # one pass for both terms (see _full_divergence)
    _, m = DISTILL_LOSSES[kind](
        student_logits=student_logits,
        mask=mask,
        temperature=temperature,
        vocab_chunk=vocab_chunk,
        **({"hard_targets": hard_targets} if fused_ce else {}),
        **teacher,
    )
    tokens, denom = m["tokens"], jnp.maximum(m["tokens"], 1.0)
    metrics = {
        "tokens": tokens,
        "distill": m["loss"],
        "distill_sum": m["loss_sum"],
        "kl_to_teacher": m["kl_to_teacher"],
        "kl_sum": m["kl_sum"],
    }
    loss_sum = alpha * m["loss_sum"]
    if alpha < 1.0:
        if fused_ce:
            ce_sum = m["nll_sum"]
        else:
            targets = hard_targets.astype(jnp.int32)[..., None]
            log_q = _logprobs_at(student_logits, targets, 1.0, vocab_chunk)[..., 0]
            ce_sum = jnp.where(mask.astype(jnp.float32) > 0, -log_q, 0.0).sum()
        metrics.update(ce=ce_sum / denom, ce_sum=ce_sum)
        loss_sum = loss_sum + (1.0 - alpha) * ce_sum
    loss = loss_sum / denom
    metrics.update(loss=loss, loss_sum=loss_sum)
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Post-training: policy gradients, BOND, reward models


def token_logprobs(
    *, logits: jax.Array, targets: jax.Array, vocab_chunk: int | None = None
) -> jax.Array:
    """float32 [batch, seq]: log_softmax(logits)[targets], logits [batch, seq, vocab].

    The target logit minus the (optionally vocabulary-chunked) logsumexp, with the hand-written
    backward of `_logprobs_at`: no one-hot and no [batch, seq, vocab] log_softmax is kept.
    """
    _check_common(1.0, vocab_chunk)
    ids = targets.astype(jnp.int32)[..., None]
    return _logprobs_at(logits, ids, 1.0, vocab_chunk)[..., 0]


GROUP_ADVANTAGES = ("grpo", "rloo", "reinforce")


def group_advantages(
    *,
    rewards: jax.Array,
    method: str,
    baseline: float | jax.Array | None = None,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """float32 [prompts, group]: advantages of rewards [prompts, group], G samples per prompt.

    Subtracting a baseline that does not depend on the sample leaves the policy gradient's
    expectation unchanged and reduces its variance; the methods differ in the baseline.
    - "grpo" (Shao et al. 2024): (r - group mean) / (group std + eps), std with ddof=0. The
      per-prompt mean removes how easy the prompt is; the division makes the update invariant to
      the reward's scale (and gives each prompt's group the same weight). A group whose rewards
      are all equal gets advantage 0 (no signal, no NaN). std_normalize=False keeps r - mean
      (Dr. GRPO), avoiding the std's bias towards prompts that are nearly always right or wrong.
    - "rloo" (Ahmadian et al. 2024): r_i - mean of the other G - 1 rewards in the group,
      = G / (G - 1) (r_i - mean). The baseline is independent of sample i, so the estimate is
      unbiased (a group mean that includes r_i shrinks it by (G - 1) / G). Needs G >= 2.
    - "reinforce": r - baseline, a scalar such as a running mean of rewards kept by the stage;
      None uses the mean over the whole batch (all prompts and samples).
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {rewards.shape}")
    r = rewards.astype(jnp.float32)
    group = r.shape[1]
    if method == "grpo":
        centred = r - r.mean(axis=1, keepdims=True)
        if not std_normalize:
            return centred
        return centred / (r.std(axis=1, keepdims=True) + eps)
    if method == "rloo":
        if group < 2:
            raise ValueError(f"rloo needs at least 2 samples per prompt, got {group}")
        return (group / (group - 1)) * (r - r.mean(axis=1, keepdims=True))
    if method == "reinforce":
        b = r.mean() if baseline is None else jnp.asarray(baseline, jnp.float32)
        return r - b
    raise ValueError(f"method must be one of {GROUP_ADVANTAGES}, got {method!r}")


def policy_gradient_loss(
    *,
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logprobs: jax.Array | None = None,
    clip_eps: float | None = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO / GRPO clipped surrogate with an optional KL penalty to a reference policy.

    Inputs: logprobs [batch, seq], the policy's log-probabilities of the sampled tokens (from
    `token_logprobs`, differentiated); old_logprobs [batch, seq], those of the policy that sampled
    them; advantages [batch], one per sequence, broadcast over its tokens; mask [batch, seq], 1 on
    the completion's tokens; ref_logprobs [batch, seq] or None. old_logprobs, advantages and
    ref_logprobs are constants (stop_gradient).

    Per token, with ratio = exp(logprobs - old_logprobs) and A the sequence's advantage,
        pg = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)   (clip_eps=None: pg = -ratio A).
    On the first update after sampling (on-policy) ratio == 1 and the gradient is REINFORCE's,
    -A grad logprob; the clip only matters on later updates of the same batch, where it stops
    pushing a token's probability further once the ratio left [1 - eps, 1 + eps] in the
    direction A favours. `clip_frac_sum` counts those tokens (where the clip zeroes the gradient).

    KL to the reference, per token, with d = ref - logprobs: "k1" = -d (unbiased but can be
    negative per token); "k3" = exp(d) - d - 1 (Schulman 2020: unbiased for KL(pi || ref) on
    samples of pi, and never negative, so much less noisy). It adds kl_coef * kl; with
    ref_logprobs None the term and `kl_sum` are 0.

    loss = sum over masked tokens of (pg + kl_coef kl) / number of masked tokens: token-level
    normalisation (DAPO, Dr. GRPO), so a long completion is not down-weighted per token.
    Metrics: loss, loss_sum, tokens, pg_sum, kl_sum, clip_frac_sum, ratio_sum (masked sums).
    """
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f'kl_estimator must be "k1" or "k3", got {kl_estimator!r}')
    on = mask.astype(jnp.float32) > 0
    tokens = on.sum().astype(jnp.float32)
    lp = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    # Padding is zeroed before exp, so garbage there cannot put inf * 0 = NaN into a gradient.
    ratio = jnp.exp(jnp.where(on, lp - old, 0.0))
    if clip_eps is None:
        pg = -ratio * adv
        clipped = jnp.zeros_like(on)
    else:
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
        clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    if ref_logprobs is None:
        kl = jnp.zeros_like(lp)
    else:
        ref = jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32))
        d = jnp.where(on, ref - lp, 0.0)
        kl = -d if kl_estimator == "k1" else jnp.expm1(d) - d
    pg_sum = jnp.where(on, pg, 0.0).sum()
    kl_sum = jnp.where(on, kl, 0.0).sum()
    loss_sum = pg_sum + kl_coef * kl_sum
    loss = loss_sum / jnp.maximum(tokens, 1.0)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "tokens": tokens,
        "pg_sum": pg_sum,
        "kl_sum": kl_sum,
        "clip_frac_sum": (clipped & on).sum().astype(jnp.float32),
        "ratio_sum": jnp.where(on, ratio, 0.0).sum(),
    }


def bond_log_cdf(*, sample_rewards: np.ndarray, anchor_rewards: np.ndarray) -> np.ndarray:
    """float64 [batch]: log F(r(y)), the anchor's reward CDF at each policy sample's reward.

    Host-side numpy. sample_rewards [batch], the rewards of the policy's samples y;
    anchor_rewards [batch, M], rewards of M anchor samples for the same prompt. The estimate is
    the mid-rank of r(y) among the M anchor rewards plus r(y) itself,
        F = (#{anchor < r(y)} + 0.5 #{anchor == r(y)} + 0.5) / (M + 1),
    ties counted half (F of a discrete reward is taken halfway through its step). Counting y as
    one more draw keeps F within [0.5 / (M + 1), (M + 0.5) / (M + 1)]: never log 0, which would
    make the BoN log-likelihood -inf for a sample worse than every anchor draw.
    """
    r = np.asarray(sample_rewards, np.float64)[:, None]
    a = np.asarray(anchor_rewards, np.float64)
    if a.ndim != 2 or a.shape[0] != r.shape[0]:
        raise ValueError(f"anchor_rewards must be [{r.shape[0]}, M], got {a.shape}")
    less = (a < r).sum(axis=1)
    equal = (a == r).sum(axis=1)
    return np.log((less + 0.5 * equal + 0.5) / (a.shape[1] + 1))


def jbond_loss(
    *,
    best_logprobs: jax.Array,
    best_mask: jax.Array,
    sample_logprobs: jax.Array,
    sample_anchor_logprobs: jax.Array,
    sample_mask: jax.Array,
    sample_log_cdf: jax.Array,
    n: int,
    beta: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """J-BOND (Sessa et al. 2024, arXiv:2407.14622): distil the anchor's Best-of-n distribution.

    Minimises the Jeffreys divergence beta KL(BoN || pi) + (1 - beta) KL(pi || BoN) between the
    policy pi and the Best-of-n distribution of an anchor policy (an EMA of pi in J-BOND).
    Inputs: best_logprobs, best_mask [batch, seq]: pi's log-probabilities of the anchor's
    best-of-n sample (differentiated); sample_logprobs, sample_mask [batch, seq]: pi's
    log-probabilities of its own samples y (differentiated); sample_anchor_logprobs [batch, seq]:
    the anchor's on the same tokens; sample_log_cdf [batch]: log F(r(y)), the anchor's reward CDF
    at y's reward (`bond_log_cdf`).

    Forward term (mode covering): the NLL of the best-of-n sample, -sum_t best_logprobs.
    Backward term (mode seeking), REINFORCE on pi's samples: with
    log p_BoN(y) ≈ log p_anchor(y) + log n + (n - 1) log F(r(y)), the per-sequence cost is
        c(y) = sum_t (sample_logprobs - sample_anchor_logprobs) - (n - 1) sample_log_cdf
    (= log pi(y) - log p_BoN(y) up to the constant log n), and the surrogate
        stop_gradient(c - mean c) * sum_t sample_logprobs
    has the score-function gradient of KL(pi || BoN), with the batch mean of c as baseline. The
    mean runs over rows with at least one sample token; as it includes y itself, the gradient's
    expectation is scaled by (B - 1) / B, a step size, not a direction. The surrogate's value is
    not the KL; `kl_anchor_sum` (sum over tokens of log pi - log anchor) is the KL to watch.

    loss_sum = beta fwd_sum + (1 - beta) bwd_sum, tokens = best and sample tokens together.
    Metrics: loss, loss_sum, tokens, fwd_sum, bwd_sum, kl_anchor_sum.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    best_on = best_mask.astype(jnp.float32) > 0
    on = sample_mask.astype(jnp.float32) > 0
    fwd_sum = -jnp.where(best_on, best_logprobs.astype(jnp.float32), 0.0).sum()
    lp = jnp.where(on, sample_logprobs.astype(jnp.float32), 0.0)
    anchor = jnp.where(on, sample_anchor_logprobs.astype(jnp.float32), 0.0)
    log_ratio = jax.lax.stop_gradient(lp - anchor).sum(-1)
    cost = log_ratio - (n - 1) * sample_log_cdf.astype(jnp.float32)
    rows = on.any(-1)
    mean_cost = jnp.where(rows, cost, 0.0).sum() / jnp.maximum(rows.sum(), 1)
    centred = jax.lax.stop_gradient(jnp.where(rows, cost - mean_cost, 0.0))
    bwd_sum = (centred * lp.sum(-1)).sum()
    loss_sum = beta * fwd_sum + (1.0 - beta) * bwd_sum
    tokens = (best_on.sum() + on.sum()).astype(jnp.float32)
    loss = loss_sum / jnp.maximum(tokens, 1.0)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "tokens": tokens,
        "fwd_sum": fwd_sum,
        "bwd_sum": bwd_sum,
        "kl_anchor_sum": log_ratio.sum(),
    }


def bradley_terry_loss(
    *, chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reward-model loss on preference pairs: mean of -log sigmoid(chosen - rejected - margin).

    chosen, rejected [pairs]: the reward model's scalar scores; margin [pairs] or None, how much
    the chosen response should win by (Llama 2's graded preferences). Written as
    softplus(-(x)), which is stable for any x. `tokens` is the number of pairs; metrics:
    loss, loss_sum, tokens, accuracy_sum (pairs with chosen > rejected), margin_sum
    (sum of chosen - rejected).
    """
    diff = chosen.astype(jnp.float32) - rejected.astype(jnp.float32)
    target = diff if margin is None else diff - margin.astype(jnp.float32)
    loss_sum = jax.nn.softplus(-target).sum()
    pairs = jnp.asarray(diff.size, jnp.float32)
    loss = loss_sum / jnp.maximum(pairs, 1.0)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "tokens": pairs,
        "accuracy_sum": (diff > 0).sum().astype(jnp.float32),
        "margin_sum": diff.sum(),
    }
