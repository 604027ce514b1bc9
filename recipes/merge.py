"""merge: one model from the weights of several finished training stages (no training).

WARM (arXiv 2401.12187): fine-tune several reward models from one init (other seeds or
  hyperparameters) and average their weights: one model's cost, more robust, less hackable.
WARP (arXiv 2406.16768): RL-fine-tune several policies from one init and merge them by
  spherical interpolation (SLERP) of their task vectors (weights minus init), per tensor.
LITI (WARP's third step): interpolate linearly from the merge back toward the init,
  base + eta * (merged - base); eta slides along a reward-vs-KL front (1 keeps the merge).

    stages:
      rm_warm:
        kind: merge
        model: student              # the models: entry all sources share (same architecture)
        sources: [rm_a, rm_b, rm_c] # finished training stages
        method: average             # average | slerp
        weights: null               # average only; default uniform
        base: sft                   # slerp and liti: the stage whose params are the init
                                    #   of the task vectors
        liti: 1.0                   # then base + liti * (merged - base); 1.0 = off
        per_tensor: true            # slerp only: one angle per tensor (WARP) or one overall

The merged parameters are saved as `<stage>/checkpoints/0`, so the stage is a `final_checkpoint`
like any training stage's: `init: {stage: rm_warm}`, `evaluate: {checkpoint: rm_warm}`. Merging
is computed in float32 (`train/merging.py`) and saved in `models.<model>.param_dtype`. The
manifest's metrics hold the global norm of each task vector and their pairwise cosines (with a
base), or the pairwise distances between the sources (without one).
"""

from __future__ import annotations

import shutil
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from pydantic import Field, model_validator

from train import merging
from train.checkpoint import Checkpointer, params_sha256
from train.config import StageConfig
from train.pipeline import StageResult


class Config(StageConfig):
    kind: Literal["merge"]
    model: str
    """the `models:` entry of the merged model; every source's model must have its architecture"""
    sources: list[str] = Field(min_length=1)
    """finished training stages whose final checkpoints are merged"""
    method: Literal["average", "slerp"] = "average"
    """average: weighted mean (WARM, soups); slerp: spherical merge of task vectors (WARP)"""
    weights: list[float] | None = None
    """average only: one weight >= 0 per source, normalised to sum 1; null: uniform"""
    base: str | None = None
    """the stage whose final checkpoint is the init of the task vectors (slerp, liti != 1)"""
    liti: float = Field(1.0, ge=0, le=1)
    """after merging: base + liti * (merged - base); 1.0 keeps the merge"""
    per_tensor: bool = True
    """slerp only: one angle per tensor (as WARP) or one angle over all weights"""

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources must be distinct stages, got {self.sources}")
        if self.weights is not None:
            if self.method != "average":
                raise ValueError("weights apply to method 'average' only")
            if len(self.weights) != len(self.sources):
                raise ValueError(
                    f"weights has {len(self.weights)} entries for {len(self.sources)} sources"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        if self.method == "slerp" and len(self.sources) < 2:
            raise ValueError("method 'slerp' needs at least 2 sources")
        if self.base is None and (self.method == "slerp" or self.liti != 1.0):
            raise ValueError("base is required for method 'slerp' and for liti != 1")
        if self.base is not None and self.base in self.sources:
            raise ValueError(f"base {self.base!r} is also a source")
        return self

    def references(self) -> dict[str, str]:
        refs = {f"sources.{i}": s for i, s in enumerate(self.sources)}
        if self.base:
            refs["base"] = self.base
        return refs

    def model_names(self) -> list[str]:
        return [self.model]

    def check(self, *, name, stages, models) -> list[str]:
        errors = []
        if self.model not in models:
            return errors  # reported as an unknown model already
        want = models[self.model].architecture()
        for field, target in self.references().items():
            if target not in stages:
                continue
            src_model = getattr(stages[target], "model", None)
            if src_model is None:
                errors.append(
                    f"{field}: stage {target!r} ({stages[target].kind}) has no model to merge"
                )
                continue
            if src_model not in models:
                continue
            have = models[src_model].architecture()
            diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            if diff:
                shown = ", ".join(f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in diff)
                errors.append(
                    f"{field}: stage {target!r} trains models.{src_model}, whose architecture "
                    f"differs from models.{self.model} ({shown}); only models of one "
                    "architecture can be merged"
                )
        return errors


def load(ctx, stage: str) -> dict:
    """A finished stage's parameters in float32, placed on the mesh like a training stage's."""
    _, params, _ = ctx.trained_params(stage, dtype="float32")
    return params


def run(cfg: Config, ctx) -> StageResult:
    # ---- load
    sources = [load(ctx, s) for s in cfg.sources]
    base = load(ctx, cfg.base) if cfg.base else None
    names = list(cfg.sources)
    merging.check_same_structure(
        [*sources, *([base] if base is not None else [])],
        [*names, *([f"base {cfg.base}"] if base is not None else [])],
    )

    # ---- merge
    if cfg.method == "average":
        merged = merging.average(trees=sources, weights=cfg.weights)
    elif len(sources) == 2:
        merged = merging.slerp(
            base=base, a=sources[0], b=sources[1], t=0.5, per_tensor=cfg.per_tensor
        )
    else:
        merged = merging.slerp_many(base=base, trees=sources, per_tensor=cfg.per_tensor)
    if cfg.liti != 1.0:
        merged = merging.liti(base=base, merged=merged, eta=cfg.liti)
    dtype = ctx.model_config(cfg.model).param_dtype
    merged = jax.tree.map(lambda x: x.astype(dtype), merged)

    metrics: dict[str, float] = {"num_sources": len(sources)}
    if base is not None:
        metrics.update(merging.task_vector_stats(base=base, trees=sources, names=names))
        metrics.update(merging.task_vector_stats(base=base, trees=[merged], names=["merged"]))
    else:
        for i in range(len(sources)):
            for j in range(i + 1, len(sources)):
                sq = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), sources[i], sources[j])
                metrics[f"param_dist/{names[i]}/{names[j]}"] = float(
                    np.sqrt(sum(float(x) for x in jax.tree.leaves(sq)))
                )

    # ---- save (a rerun after a crash redoes the merge: it is deterministic)
    ckpt_dir = ctx.stage_dir / "checkpoints"
    if (ckpt_dir / "0").exists():
        if jax.process_index() == 0:
            shutil.rmtree(ckpt_dir / "0")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("distillax_merge_redo")
    meta = {"step": 0, "config_hash": ctx.config_hash, "sources": names, "base": cfg.base}
    with Checkpointer(directory=ckpt_dir, keep=1, async_save=False) as ckpt:
        ckpt.save(0, state={"params": merged}, meta=meta)
    sha = params_sha256(merged)
    logger = ctx.logger(total_steps=1, start_step=0)
    logger.log(0, metrics, kind="merge")
    logger.close()
    return StageResult(
        status="done",
        step=0,
        final_checkpoint=str(ckpt_dir / "0"),
        params_sha256=sha,
        metrics=metrics,
    )
