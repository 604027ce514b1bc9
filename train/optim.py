"""Optimizer from `OptimConfig`: AdamW with warmup + cosine/linear/constant decay and clipping.

Weight decay skips vectors (norm scales, biases), as is usual for transformers: decaying a
(1 + w) norm scale towards 0 would pull it towards identity for no reason.
"""

from __future__ import annotations

import jax
import optax

from train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, *, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def build_optimizer(cfg: OptimConfig, *, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps=total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
