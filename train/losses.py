"""Losses as pure, keyword-only functions returning (loss, metrics). Softmax in float32.

Shapes: logits [batch, seq, vocab], targets and mask [batch, seq].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
