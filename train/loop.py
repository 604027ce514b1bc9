"""What every training stage shares: the jitted step, evaluation, and stopping on SIGTERM.

A stage (recipes/*.py) reads top to bottom and calls these pieces; there is no trainer class.

The train step is one jitted function of (params, opt_state, batch, step) with explicit
shardings and donated state. Its loss function returns SUMS over tokens, and the step divides by
the batch's token count, so gradient accumulation over micro-batches gives exactly the gradient
of the whole batch. A non-finite loss or gradient never reaches the parameters: the update is
dropped inside the step (no host sync) and counted in `nonfinite`; the stage then stops or
carries on according to its `nan_policy` when it next reads the metrics.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# loss_fn(model, batch, rng, extra) -> (sum of per-token losses, {metric: sum, "tokens": n}).
# `extra` is whatever else the step needs on device (a teacher's parameters), or None.
LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    grad_accum: int,
    param_shardings,
    opt_shardings,
    batch_sharding,
    rng: jax.Array,
    extra_shardings=None,
):
    """A jitted `step(params, opt_state, batch, step, extra) -> (params, opt_state, metrics)`.

    `extra` (sharded as `extra_shardings`) is passed through to the loss, e.g. frozen teacher
    parameters for online distillation; it is an argument rather than a closure so that XLA
    does not embed it in the program as a constant.
    """
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())

    def micro_loss(params, batch, key, extra):
        loss_sum, sums = loss_fn(nnx.merge(graphdef, params), batch, key, extra)
        return loss_sum, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(params, opt_state, batch, step_index, extra):
        key = jax.random.fold_in(rng, step_index)
        if grad_accum == 1:
            (_, sums), grads = grad_fn(params, batch, key, extra)
        else:
            # micro-batch j takes rows j, j+A, j+2A, ...: every device keeps an equal share
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(
                    0, 1
                ),
                batch,
            )

            def body(carry, inputs):
                j, mb = inputs
                (_, s), g = grad_fn(params, mb, jax.random.fold_in(key, j), extra)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_g = jax.tree.map(jnp.zeros_like, params)
            (_, zero_s), _ = jax.eval_shape(
                grad_fn, params, jax.tree.map(lambda x: x[0], micro), key, extra
            )
            zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_s)
            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (jnp.arange(grad_accum), micro))
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        metrics = {k: v / tokens for k, v in sums.items() if k != "tokens"}
        metrics["tokens"] = sums["tokens"]
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics["grad_norm"] = grad_norm
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated, extra_shardings),
        out_shardings=(param_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(
    *,
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    param_shardings,
    batch_sharding,
    extra_shardings=None,
):
    """A jitted `eval_step(params, batch, extra) -> sums` (no gradient, fixed rng)."""
    key = jax.random.key(0)

    def eval_step(params, batch, extra):
        _, sums = loss_fn(nnx.merge(graphdef, params), batch, key, extra)
        return sums

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, extra_shardings))


def evaluate(eval_step, params, batches: Iterable[dict], *, put, extra=None) -> dict[str, float]:
    """Token-weighted means of the eval sums over `batches`, plus perplexity."""
    total: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(eval_step(params, put(batch), extra))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    tokens = max(total.pop("tokens", 0.0), 1.0)
    out = {f"eval_{k}": v / tokens for k, v in total.items()}
    if "eval_kl_to_teacher" in out:  # the manifest's name for it
        out["kl_to_teacher"] = out.pop("eval_kl_to_teacher")
    if "eval_loss" in out:
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    out["eval_tokens"] = tokens
    return out


def heldout_sums(model, batch: dict, *, teacher=None) -> dict[str, jax.Array]:
    """Sums for held-out evaluation: next-token NLL, correct predictions, tokens, and with a
    teacher model KL(teacher || model) over the full vocabulary."""
    from train.losses import full_kl, next_token_ce

    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = model(batch["inputs"], **kw)
    _, m = next_token_ce(logits=logits, targets=batch["targets"], mask=batch["loss_mask"])
    out = {"loss": m["nll_sum"], "accuracy": m["correct_sum"], "tokens": m["tokens"]}
    if teacher is not None:
        t_logits = jax.lax.stop_gradient(teacher(batch["inputs"], **kw))
        _, k = full_kl(student_logits=logits, teacher_logits=t_logits, mask=batch["loss_mask"])
        out["kl_to_teacher"] = k["kl_sum"]
    return out


def put_batch(batch: dict, sharding) -> dict:
    """Host numpy batch -> global jax arrays on the mesh (each process supplies its rows).

    `sharding` is for [batch, seq] arrays; lower-rank arrays (per-row ids) take the leading
    part of its spec and higher-rank ones (teacher targets [batch, seq, k]) replicate the rest.
    """
    spec = tuple(sharding.spec)

    def one(v):
        v = np.asarray(v)
        sh = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[: v.ndim]))
        if jax.process_count() == 1:
            return jax.device_put(v, sh)
        return jax.make_array_from_process_local_data(sh, v)

    return {k: one(v) for k, v in batch.items()}


class StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves a checkpoint and returns at the next step.

    A scheduler's SIGTERM (preemption, scancel) then costs nothing but the current step.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------
# model parameters: random, from a pipeline stage, a checkpoint directory or Hugging Face


def abstract_params(model_cfg, *, mesh, rules):
    """(graphdef, abstract params with shardings, shardings) without allocating anything."""
    from train.mesh import param_shardings
    from train.models.gemma import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh=mesh, rules=rules).to_pure_dict()
    shapes = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state.to_pure_dict(),
        shardings,
    )
    return graphdef, shapes, shardings


def load_params(path: str, *, abstract) -> dict:
    """Parameters from a distillax checkpoint step directory (`<stage>/checkpoints/<step>`)."""
    from pathlib import Path

    from train.checkpoint import Checkpointer

    step_dir = Path(path)
    if not step_dir.exists() or not step_dir.name.isdigit():
        raise FileNotFoundError(f"{path}: not a checkpoint step directory (…/checkpoints/<step>)")
    with Checkpointer(directory=step_dir.parent, keep=1_000_000, async_save=False) as ckpt:
        state, _ = ckpt.restore(int(step_dir.name), abstract_state={"params": abstract})
    return state["params"]


def init_params(*, model_cfg, init, mesh, rules, seed: int, artifact=None):
    """(graphdef, params, shardings) for a stage's model, placed on the mesh.

    `init` is an InitConfig: nothing set gives a random init from `seed` (drawn directly in
    shards), `stage` the final checkpoint of an upstream stage (`artifact(stage)` gives its
    manifest entry), `checkpoint` a step directory, `hf` a Hugging Face checkpoint whose
    architecture must equal `model_cfg`.
    """
    from train.mesh import init_sharded
    from train.models.gemma import Transformer

    graphdef, abstract, shardings = abstract_params(model_cfg, mesh=mesh, rules=rules)
    if init.stage:
        return (
            graphdef,
            load_params(artifact(init.stage)["final_checkpoint"], abstract=abstract),
            shardings,
        )
    if init.checkpoint:
        return graphdef, load_params(init.checkpoint, abstract=abstract), shardings
    if init.hf:
        from train.models.hf import load_hf

        model = load_hf(
            init.hf,
            param_dtype=model_cfg.param_dtype,
            compute_dtype=model_cfg.compute_dtype,
            scan_layers=model_cfg.scan_layers,
            remat=model_cfg.remat,
        )
        theirs, ours = model.cfg.architecture(), model_cfg.architecture()
        diff = [k for k in ours if ours[k] != theirs[k]]
        if diff:
            raise ValueError(
                f"init.hf {init.hf}: the checkpoint's architecture differs from the model in "
                + ", ".join(f"{k} (checkpoint {theirs[k]!r}, config {ours[k]!r})" for k in diff)
            )
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return graphdef, jax.device_put(params, shardings), shardings
    model = init_sharded(
        lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)), mesh=mesh, rules=rules
    )
    return graphdef, nnx.state(model, nnx.Param).to_pure_dict(), shardings


# ---------------------------------------------------------------------------------------------
# the loop every training stage runs: step, log, eval, checkpoint, stop on SIGTERM, resume


def init_optimizer(*, optim, total_steps: int, params, shardings):
    """(tx, opt_state on the mesh, opt_shardings, lr_at) for a stage's `optim:` section."""
    from train.mesh import like_params_shardings
    from train.optim import build_optimizer, learning_rate_schedule

    tx = build_optimizer(optim, total_steps=total_steps)
    opt_shardings = like_params_shardings(
        jax.eval_shape(tx.init, params), params=params, shardings=shardings
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return tx, opt_state, opt_shardings, learning_rate_schedule(optim, total_steps=total_steps)


def summarize(host: list[tuple[int, dict]]) -> dict[str, float]:
    """Metrics of the steps since the last log: means, except the last grad_norm and the number
    of skipped (non-finite) updates."""
    out = {}
    for k in host[-1][1]:
        vals = [float(np.mean(m[k])) for _, m in host if k in m]
        if k == "nonfinite":
            out["skipped"] = int(sum(vals))
        elif k == "grad_norm":
            out[k] = vals[-1]
        elif k != "tokens":
            out[k] = float(np.mean(vals))
    return out


def train_loop(
    *,
    ctx,
    cfg,
    state: dict,
    step_fn: Callable[[dict, int], tuple[dict, dict]],
    data=None,
    run_eval: Callable[[dict], dict] | None = None,
    lr_at: Callable[[int], Any] | None = None,
    tokens_per_step: int = 0,
    on_log: Callable[[int, dict, Any], None] | None = None,
    end_metrics: Callable[[], dict] | None = None,
):
    """Run steps `start+1 .. cfg.steps` of a training stage and return its StageResult: done
    (final checkpoint, fingerprint, final eval + `end_metrics()`), or interrupted when SIGTERM
    stopped it (after saving a checkpoint).

    `state` is everything that changes during training (params, optimizer state, an EMA
    anchor, ...): it is what a checkpoint holds, and a restored one replaces it, so a killed
    stage continues exactly. `data` is the data iterator (anything with get_state/set_state),
    saved in the checkpoint's metadata. `step_fn(state, step)` does step `step` (1-based; any
    randomness is folded in from the step, so it resumes exactly too) and returns the new state
    and its metrics, left on device until log time so that the loop never waits for a step.
    `run_eval(state)` gives held-out metrics; `on_log(step, state, logger)` adds stage-specific
    records (sample tables) at log steps.
    """
    from train.checkpoint import Checkpointer
    from train.metrics import Throughput, check_finite

    ckpt = Checkpointer(
        directory=ctx.stage_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )
    start = 0
    restored = ckpt.restore_latest(abstract_state=abstract)
    if restored is not None:
        state, start = restored.state, restored.step
        if data is not None:
            data.set_state(restored.meta["data"])
    logger = ctx.logger(total_steps=cfg.steps, start_step=start)
    log_every = ctx.pipeline.logging.every
    throughput = Throughput()

    def save(step: int) -> None:
        meta = {"step": step, "config_hash": ctx.config_hash}
        if data is not None:
            meta["data"] = data.get_state()
        with throughput.paused():
            ckpt.save(step, state=state, meta=meta)
        ctx.progress(step=step)

    pending = []  # per-step metrics still on device: read at log time, no per-step host sync
    try:
        for step in range(start + 1, cfg.steps + 1):
            state, metrics = step_fn(state, step)
            pending.append((step, metrics))
            throughput.tick(tokens=tokens_per_step)
            if step % log_every == 0 or step == cfg.steps or ctx.stop.requested:
                host = [(s, jax.device_get(m)) for s, m in pending]
                pending.clear()
                for s, m in host:  # raises under nan_policy "stop"; warns under "skip"
                    if m.get("nonfinite"):
                        check_finite(s, m, policy=cfg.nan_policy)
                record = summarize(host)
                if lr_at is not None:
                    record["lr"] = float(lr_at(step - 1))
                logger.log(step, {**record, **throughput.rates()})
                if on_log is not None:
                    with throughput.paused():
                        on_log(step, state, logger)
            else:
                logger.advance(step)
            if run_eval and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                with throughput.paused():
                    logger.log(step, run_eval(state), kind="eval")
            if step % cfg.checkpoint.every == 0 or step == cfg.steps or ctx.stop.requested:
                save(step)
            if ctx.stop.requested and step < cfg.steps:
                return ctx.interrupted()
        ckpt.wait()
        final = run_eval(state) if run_eval else {}
        if final:
            logger.log(cfg.steps, final, kind="eval")
    finally:
        ckpt.close()
        logger.close()
    final.update(end_metrics() if end_metrics else {})
    return finish(ctx=ctx, cfg=cfg, params=state["params"], metrics=final)


def finish(*, ctx, cfg, params, metrics: dict):
    """The StageResult of a finished training stage: final checkpoint, fingerprint, metrics."""
    from train.checkpoint import params_sha256
    from train.pipeline import StageResult

    return StageResult(
        status="done",
        step=cfg.steps,
        final_checkpoint=str(ctx.stage_dir / "checkpoints" / str(cfg.steps)),
        params_sha256=params_sha256(params),
        metrics=metrics,
    )
