"""distill: pretrain a student on a teacher's distribution (Gemma 2 / Gemma 3 recipe).

    stages:
      student:
        kind: distill
        model: student
        logits: logits                 # offline: a sample_logits stage's store ...
        # teacher: teacher             # ... or online: run this stage's teacher in the step
        loss: {kind: sampled_ce, alpha: 1.0, temperature: 1.0}
        data: {corpus: kjv, seq_len: 128, batch_size: 16, max_rows: 2400}
        steps: 300

Offline, every batch row's targets come from the store by row index (`data/logit_store.py`);
the store's manifest must match the student's vocabulary, the tokenizer and the sequence
length, or the stage stops before training. Online, the teacher runs inside the jitted step
(frozen, optionally in bf16) and the targets are drawn there with the same sampler. Held-out
evaluation reports the student's perplexity and KL(teacher || student). Setup, loop and end
follow `recipes/pretrain.py`; a killed run resumes exactly (the store is read by row index, so
the data iterator position is all the state it needs).
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx
from pydantic import model_validator

from data import logit_store
from data.pipeline import eval_dataset, make_iterator, train_dataset
from train.config import DistillLossConfig, TrainStageConfig
from train.loop import (
    evaluate,
    heldout_sums,
    init_optimizer,
    init_params,
    make_eval_step,
    make_train_step,
    put_batch,
    train_loop,
)
from train.losses import distill_loss
from train.mesh import batch_sharding

# which stored targets each loss can use
LOSS_FOR_METHOD = {
    "sampled": ("sampled_ce",),
    "top_k": ("topk_kl", "sampled_ce"),
    "full": ("full_kl",),
}


class Config(TrainStageConfig):
    kind: Literal["distill"]
    logits: str | None = None
    """offline: a sample_logits stage whose store holds the teacher's targets"""
    teacher: str | None = None
    """online: a training stage whose final checkpoint is run as the teacher in every step"""
    loss: DistillLossConfig = DistillLossConfig()
    teacher_dtype: Literal["float32", "bfloat16"] | None = None
    """online: run the teacher in this dtype (default: its own)"""
    online_k: int = 256
    """online sampled_ce / topk_kl: draws (or top ids) per position"""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.logits is None) == (self.teacher is None):
            raise ValueError("set exactly one of logits (offline) or teacher (online)")
        return self

    def references(self) -> dict[str, str]:
        refs = super().references()
        if self.logits:
            refs["logits"] = self.logits
        if self.teacher:
            refs["teacher"] = self.teacher
        return refs

    def check(self, *, name, stages, models) -> list[str]:
        errors = []
        if self.teacher and self.teacher in stages and not hasattr(stages[self.teacher], "model"):
            errors.append(f"teacher: stage {self.teacher!r} has no model")
        t_stage = self.teacher or getattr(stages.get(self.logits), "teacher", None)
        t_model = getattr(stages.get(t_stage), "model", None)
        if t_model in models and self.model in models:
            tv, sv = models[t_model].vocab_size, models[self.model].vocab_size
            if tv != sv:
                errors.append(
                    f"model: the student's vocab_size {sv} differs from the teacher's ({tv}, "
                    f"models.{t_model}); distillation matches distributions over one vocabulary"
                )
        src = stages.get(self.logits) if self.logits else None
        if src is not None:
            if src.kind != "sample_logits":
                return [f"logits: stage {self.logits!r} is a {src.kind} stage, not sample_logits"]
            for key in ("corpus", "seq_len", "heldout_fraction", "max_rows"):
                mine, theirs = getattr(self.data, key), getattr(src.data, key)
                if mine != theirs:
                    errors.append(
                        f"data.{key}: {mine!r} differs from the logit store's "
                        f"(stages.{self.logits}.data.{key}: {theirs!r}); the targets are per "
                        "packed row, so the rows must be the same"
                    )
            if self.loss.kind not in LOSS_FOR_METHOD[src.method]:
                errors.append(
                    f"loss.kind: {self.loss.kind!r} cannot use {src.method!r} targets; valid: "
                    f"{', '.join(LOSS_FOR_METHOD[src.method])}"
                )
        return errors


def teacher_stage(cfg: Config, ctx) -> str:
    return cfg.teacher or ctx.pipeline.stages[cfg.logits].teacher


TEACHER_ARGS = {
    "sampled_ce": ("ids", "valid", "teacher_logprobs", "counts"),
    "topk_kl": ("ids", "valid", "teacher_logprobs"),
}


def make_loss(cfg: Config, *, teacher_graphdef):
    """loss_fn(model, batch, rng, teacher_params) for the train step (see train/loop.py).

    teacher_params is None offline (the stored targets ride in the batch); online the teacher
    runs here and its targets are drawn with the store's own sampler, so both modes feed the
    loss the same thing.
    """
    lc = cfg.loss
    options = {
        "sampled_ce": dict(weights=lc.weights),
        "topk_kl": dict(renormalize=lc.renormalize),
        "full_kl": dict(divergence=lc.divergence, beta=lc.beta),
    }[lc.kind]

    def loss_fn(model, batch, rng, teacher_params):
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = model(batch["inputs"], **kw)
        if teacher_params is None:
            targets = batch
            t_logits = batch.get("teacher_logprobs")  # a full store: log-probs of every id
        else:
            t_logits = nnx.merge(teacher_graphdef, teacher_params)(batch["inputs"], **kw)
            t_logits = jax.lax.stop_gradient(t_logits)
            if lc.kind != "full_kl":
                method = "sampled" if lc.kind == "sampled_ce" else "top_k"
                targets = logit_store.sample_targets(
                    key=rng, logits=t_logits, method=method, k=cfg.online_k
                )
        if lc.kind == "full_kl":
            teacher = {"teacher_logits": t_logits}
        else:
            teacher = {k: targets[k] for k in TEACHER_ARGS[lc.kind]}
            if lc.kind == "sampled_ce" and lc.weights == "probs":
                del teacher["counts"]
        _, m = distill_loss(
            kind=lc.kind,
            alpha=lc.alpha,
            student_logits=logits,
            mask=batch["loss_mask"],
            hard_targets=batch["targets"],
            temperature=lc.temperature,
            **teacher,
            **options,
        )
        sums = {"loss": m["loss_sum"], "kl_to_teacher": m["kl_sum"], "tokens": m["tokens"]}
        return m["loss_sum"], sums

    return loss_fn


def run(cfg: Config, ctx):
    # ---- setup: student, optimizer, teacher or store, data, resume
    model_cfg = ctx.model_config(cfg.model)
    tokenizer = ctx.tokenizer()
    mesh, rules = ctx.mesh, ctx.rules
    graphdef, params, shardings = init_params(
        model_cfg=model_cfg,
        init=cfg.init,
        mesh=mesh,
        rules=rules,
        seed=ctx.seed,
        artifact=ctx.artifact,
    )
    t_stage = teacher_stage(cfg, ctx)
    t_graphdef, t_params, t_shardings = ctx.trained_params(t_stage, dtype=cfg.teacher_dtype)
    store = None
    if cfg.logits:
        store = logit_store.LogitStoreReader(ctx.artifact(cfg.logits)["outputs"]["logits"])
        store.check_compatible(
            vocab_size=model_cfg.vocab_size,
            tokenizer_fingerprint=tokenizer.fingerprint(),
            seq_len=cfg.data.seq_len,
            params_sha256=ctx.artifact(t_stage)["params_sha256"],
        )
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    put = lambda b: put_batch(b, on_batch)
    online = store is None
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=make_loss(cfg, teacher_graphdef=t_graphdef),
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(ctx.seed),
        extra_shardings=t_shardings if online else None,
    )

    def eval_loss(model, batch, rng, teacher_params):
        sums = heldout_sums(model, batch, teacher=nnx.merge(t_graphdef, teacher_params))
        return sums["loss"], sums

    eval_step = make_eval_step(
        graphdef=graphdef,
        loss_fn=eval_loss,
        param_shardings=shardings,
        batch_sharding=on_batch,
        extra_shardings=t_shardings,
    )

    cache_dir = ctx.run_dir / "cache"
    data_kw = dict(
        corpus=cfg.data.corpus,
        tokenizer=tokenizer,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.data.batch_size,
        cache_dir=cache_dir,
        heldout_fraction=cfg.data.heldout_fraction,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = make_iterator(
        train_dataset(seed=ctx.seed, max_rows=cfg.data.max_rows, with_row_ids=True, **data_kw)
    )
    eval_set = eval_dataset(**data_kw)
    eval_batches = [eval_set[i] for i in range(min(len(eval_set), cfg.eval.batches))]

    def next_batch() -> dict:
        batch = next(batches)
        row_ids = batch.pop("row_ids")
        if store is not None:
            targets = store.read_rows(row_ids)
            batch.update({k: targets[k] for k in ("ids", "valid", "teacher_logprobs", "counts")})
        return put(batch)

    def step_fn(state, step):
        params, opt_state, metrics = train_step(
            state["params"],
            state["opt_state"],
            next_batch(),
            step - 1,
            t_params if online else None,
        )
        return {"params": params, "opt_state": opt_state}, metrics

    # ---- loop (train/loop.py: log, eval, checkpoint, SIGTERM, resume)
    return train_loop(
        ctx=ctx,
        cfg=cfg,
        state={"params": params, "opt_state": opt_state},
        step_fn=step_fn,
        data=batches,
        run_eval=lambda s: evaluate(eval_step, s["params"], eval_batches, put=put, extra=t_params),
        lr_at=lr_at,
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
    )
