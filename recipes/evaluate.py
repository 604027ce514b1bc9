"""evaluate: held-out perplexity, next-token accuracy and KL to a teacher for any checkpoint.

    stages:
      eval_student:
        kind: evaluate
        checkpoint: student        # a training stage: its final checkpoint and model
        teacher: teacher           # optional: adds kl_to_teacher = KL(teacher || model)
        data: {corpus: kjv, seq_len: 128, batch_size: 16}
        batches: null              # null: the whole held-out split

The numbers go to the manifest (`metrics`) and `<stage>/metrics.jsonl`.
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx
from pydantic import Field

from data.pipeline import eval_dataset
from train.config import DataConfig, StageConfig
from train.loop import evaluate, heldout_sums, make_eval_step, put_batch
from train.mesh import batch_sharding
from train.pipeline import StageResult


class Config(StageConfig):
    kind: Literal["evaluate"]
    checkpoint: str
    """the training stage whose final checkpoint is evaluated"""
    teacher: str | None = None
    """a training stage whose model is the reference for kl_to_teacher"""
    data: DataConfig = DataConfig()
    batches: int | None = Field(None, ge=1)

    def references(self) -> dict[str, str]:
        refs = {"checkpoint": self.checkpoint}
        if self.teacher:
            refs["teacher"] = self.teacher
        return refs

    def check(self, *, name, stages, models) -> list[str]:
        errors = []
        for field, target in self.references().items():
            if target in stages and not hasattr(stages[target], "model"):
                errors.append(f"{field}: stage {target!r} ({stages[target].kind}) has no model")
        return errors


def run(cfg: Config, ctx) -> StageResult:
    mesh = ctx.mesh
    graphdef, params, shardings = ctx.trained_params(cfg.checkpoint)
    teacher = None
    if cfg.teacher:
        t_graphdef, t_params, t_shardings = ctx.trained_params(cfg.teacher)
        teacher = (t_params, t_shardings)

    def loss_fn(model, batch, rng, extra):
        t_model = None if extra is None else nnx.merge(t_graphdef, extra)
        sums = heldout_sums(model, batch, teacher=t_model)
        return sums["loss"], sums

    on_batch = batch_sharding(mesh)
    eval_step = make_eval_step(
        graphdef=graphdef,
        loss_fn=loss_fn,
        param_shardings=shardings,
        batch_sharding=on_batch,
        extra_shardings=None if teacher is None else teacher[1],
    )
    data = eval_dataset(
        corpus=cfg.data.corpus,
        tokenizer=ctx.tokenizer(),
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.data.batch_size,
        cache_dir=ctx.run_dir / "cache",
        heldout_fraction=cfg.data.heldout_fraction,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    n = len(data) if cfg.batches is None else min(cfg.batches, len(data))
    metrics = evaluate(
        eval_step,
        params,
        (data[i] for i in range(n)),
        put=lambda b: put_batch(b, on_batch),
        extra=None if teacher is None else teacher[0],
    )
    logger = ctx.logger(total_steps=1, start_step=0)
    logger.log(0, metrics, kind="eval")
    logger.close()
    return StageResult(status="done", step=0, metrics=metrics)
