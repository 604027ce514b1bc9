"""pretrain: next-token cross-entropy on packed text (teachers, and from-scratch baselines).

    stages:
      teacher:
        kind: pretrain
        model: teacher                 # a name under `models:`
        init: {}                       # or {stage: ...}, {checkpoint: ...}, {hf: ...}
        data: {corpus: kjv, seq_len: 256, batch_size: 16}
        optim: {lr: 3.0e-3, warmup_steps: 100, schedule: cosine}
        steps: 1500

Reads top to bottom: setup (tokenizer, model, optimizer, data, resume), the loop (step, log,
eval, checkpoint, stop on SIGTERM), the end (final eval, fingerprint). A killed run restarted
with the same command continues from its latest checkpoint and ends with the same parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import numpy as np

from data.corpus import load_documents
from data.pipeline import eval_dataset, make_iterator, tokenize_documents, train_dataset
from train.checkpoint import Checkpointer, params_sha256
from train.config import TrainStageConfig
from train.loop import evaluate, init_params, make_eval_step, make_train_step, put_batch
from train.losses import next_token_ce
from train.mesh import batch_sharding, like_params_shardings
from train.metrics import Throughput, check_finite
from train.optim import build_optimizer, learning_rate_schedule
from train.pipeline import StageResult


class Config(TrainStageConfig):
    kind: Literal["pretrain"]


def lm_loss(model, batch, rng, extra):
    """Sum of next-token NLL over real target tokens, with the sums needed for metrics."""
    del rng, extra
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    _, m = next_token_ce(logits=logits, targets=batch["targets"], mask=batch["loss_mask"])
    return m["nll_sum"], {"loss": m["nll_sum"], "accuracy": m["correct_sum"], "tokens": m["tokens"]}


def unigram_ppl(*, cfg: Config, tokenizer, cache_dir, eval_batches) -> float:
    """Perplexity of add-one unigram frequencies of the train split: the bar to clear."""
    docs = load_documents(
        cfg.data.corpus, split="train", heldout_fraction=cfg.data.heldout_fraction
    )
    tokens = tokenize_documents(docs=docs, tokenizer=tokenizer, cache_dir=cache_dir).tokens
    counts = np.bincount(np.asarray(tokens), minlength=tokenizer.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    nll = sum(float(-(logp[b["targets"]] * b["loss_mask"]).sum()) for b in eval_batches)
    n = sum(float(b["loss_mask"].sum()) for b in eval_batches)
    return math.exp(nll / max(n, 1.0))


def run(cfg: Config, ctx) -> StageResult:
    # ---- setup
    model_cfg = ctx.model_config(cfg.model)
    tokenizer = ctx.tokenizer()
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"models.{cfg.model}.vocab_size is {model_cfg.vocab_size} but the tokenizer has "
            f"{tokenizer.vocab_size} tokens"
        )
    mesh, rules = ctx.mesh, ctx.rules
    graphdef, params, shardings = init_params(
        model_cfg=model_cfg,
        init=cfg.init,
        mesh=mesh,
        rules=rules,
        seed=ctx.seed,
        artifact=ctx.artifact,
    )
    tx = build_optimizer(cfg.optim, total_steps=cfg.steps)
    lr_at = learning_rate_schedule(cfg.optim, total_steps=cfg.steps)
    opt_shardings = like_params_shardings(
        jax.eval_shape(tx.init, params), params=params, shardings=shardings
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    batches_on = batch_sharding(mesh)
    put = lambda b: put_batch(b, batches_on)
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=lm_loss,
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=batches_on,
        rng=jax.random.key(ctx.seed),
    )
    eval_step = make_eval_step(
        graphdef=graphdef, loss_fn=lm_loss, param_shardings=shardings, batch_sharding=batches_on
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
    batches = make_iterator(train_dataset(seed=ctx.seed, max_rows=cfg.data.max_rows, **data_kw))
    eval_set = eval_dataset(**data_kw)
    eval_batches = [eval_set[i] for i in range(min(len(eval_set), cfg.eval.batches))]
    run_eval = lambda p: evaluate(eval_step, p, eval_batches, put=put)

    ckpt = Checkpointer(
        directory=ctx.stage_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": params, "opt_state": opt_state},
    )
    start = 0
    restored = ckpt.restore_latest(abstract_state=abstract)
    if restored is not None:
        params, opt_state = restored.state["params"], restored.state["opt_state"]
        batches.set_state(restored.meta["data"])
        start = restored.step
    logger = ctx.logger(total_steps=cfg.steps, start_step=start)
    log_every = ctx.pipeline.logging.every
    throughput = Throughput()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    def save(step: int) -> None:
        meta = {"step": step, "data": batches.get_state(), "config_hash": ctx.config_hash}
        with throughput.paused():
            ckpt.save(step, state={"params": params, "opt_state": opt_state}, meta=meta)
        ctx.progress(step=step)

    # ---- loop
    pending = []  # per-step metrics still on device: read at log time, no per-step host sync
    step = start
    for step in range(start + 1, cfg.steps + 1):
        params, opt_state, metrics = train_step(
            params, opt_state, put(next(batches)), step - 1, None
        )
        pending.append((step, metrics))
        throughput.tick(tokens=tokens_per_step)
        if step % log_every == 0 or step == cfg.steps or ctx.stop.requested:
            host = [(s, jax.device_get(m)) for s, m in pending]
            pending.clear()
            for s, m in host:  # raises under nan_policy "stop"; warns under "skip"
                if m["nonfinite"]:
                    check_finite(s, m, policy=cfg.nan_policy)
            logger.log(
                step,
                {
                    "loss": float(np.mean([m["loss"] for _, m in host])),
                    "accuracy": float(np.mean([m["accuracy"] for _, m in host])),
                    "grad_norm": float(host[-1][1]["grad_norm"]),
                    "lr": float(lr_at(step - 1)),
                    "skipped": int(sum(m["nonfinite"] for _, m in host)),
                    **throughput.rates(),
                },
            )
        else:
            logger.advance(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
            with throughput.paused():
                logger.log(step, run_eval(params), kind="eval")
        if step % cfg.checkpoint.every == 0 or step == cfg.steps or ctx.stop.requested:
            save(step)
        if ctx.stop.requested and step < cfg.steps:
            ckpt.close()
            logger.close()
            return StageResult(status="interrupted", step=step)
    ckpt.wait()

    # ---- end
    final = run_eval(params)
    final["unigram_ppl"] = unigram_ppl(
        cfg=cfg, tokenizer=tokenizer, cache_dir=cache_dir, eval_batches=eval_batches
    )
    logger.log(cfg.steps, final, kind="eval")
    logger.close()
    ckpt.close()
    return StageResult(
        status="done",
        step=cfg.steps,
        final_checkpoint=str(ctx.stage_dir / "checkpoints" / str(cfg.steps)),
        params_sha256=params_sha256(params),
        metrics=final,
    )
