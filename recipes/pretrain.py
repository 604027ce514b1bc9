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
from jax.experimental import multihost_utils

from data.corpus import load_documents
from data.pipeline import eval_dataset, make_iterator, tokenize_documents, train_dataset
from train.config import TrainStageConfig
from train.loop import (
    evaluate,
    init_optimizer,
    init_params,
    make_eval_step,
    make_train_step,
    put_batch,
    train_loop,
)
from train.losses import next_token_ce
from train.mesh import batch_sharding


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
    if jax.process_count() > 1:  # eval_batches hold this process's rows only: add up all of them
        nll, n = multihost_utils.process_allgather(np.array([nll, n])).sum(axis=0)
    return math.exp(nll / max(n, 1.0))


def run(cfg: Config, ctx):
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
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
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

    def step_fn(state, step):
        params, opt_state, metrics = train_step(
            state["params"], state["opt_state"], put(next(batches)), step - 1, None
        )
        return {"params": params, "opt_state": opt_state}, metrics

    # ---- loop (train/loop.py: log, eval, checkpoint, SIGTERM, resume)
    return train_loop(
        ctx=ctx,
        cfg=cfg,
        state={"params": params, "opt_state": opt_state},
        step_fn=step_fn,
        data=batches,
        run_eval=lambda state: evaluate(eval_step, state["params"], eval_batches, put=put),
        lr_at=lr_at,
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        end_metrics=lambda: {
            "unigram_ppl": unigram_ppl(
                cfg=cfg, tokenizer=tokenizer, cache_dir=cache_dir, eval_batches=eval_batches
            )
        },
    )
