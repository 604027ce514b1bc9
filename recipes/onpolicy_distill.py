"""onpolicy_distill: distil a teacher on the student's own samples (GKD; Gemma 2 §4).

    stages:
      onpolicy:
        kind: onpolicy_distill
        model: student
        init: {stage: sft}
        teacher: teacher_it            # a training stage whose model scores the student's tokens
        task: {name: arithmetic, options: {max_value: 20, ops: "+"}, train_size: 2000,
               test_size: 100}
        rollout: {prompts_per_step: 16, samples_per_prompt: 1, max_new_tokens: 8,
                  max_prompt_len: 32, temperature: 1.0}
        divergence: reverse            # forward | reverse | jsd
        beta: 0.5                      # jsd only
        on_policy_fraction: 1.0        # lambda: share of steps on the student's own samples
        temperature: 1.0               # loss temperature (the loss is multiplied by T^2)
        optim: {lr: 1.0e-4, warmup_steps: 0}
        steps: 50
        rewards: {math_exact: 1.0}     # scores held-out greedy answers (accuracy)

Why on-policy: a student trained only on fixed sequences (the dataset's, or the teacher's) is
trained on prefixes it never produces itself, then at inference continues its own, possibly
wrong, prefixes (train/inference mismatch, exposure bias). GKD (Agarwal et al. 2023, arXiv
2306.13649) instead samples responses from the current student and minimises a per-token
divergence to the teacher on them; Gemma 2 post-trains with this "distillation from the teacher
on the student's distribution". The samples are treated as data: no gradient flows through the
sampling, only through the student's per-token distributions on them.

Each step s draws its prompts (`train/rollout.py: step_examples`) and decides with a draw from
(seed, s) whether it is on-policy (probability `on_policy_fraction`, GKD's lambda): then the
responses are the student's samples with the rng fold_in(key(seed), s); otherwise the dataset's
reference responses (+ <end_of_turn>, supervised KD). Prompt + response rows have a fixed width
(max_prompt_len + max_new_tokens: one compiled step) with the loss on response tokens only. The
teacher (frozen, passed to the jitted step as an argument) scores the same rows, and the loss is
`full_kl` with the chosen divergence. Everything of step s is a function of (seed, s) and the
state {params, opt_state}, so a killed stage resumes exactly. Held-out evaluation reports the
divergence (eval_loss) and KL(teacher || student) (kl_to_teacher, at T = 1) on the test split's
reference responses, and the accuracy of greedy answers.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from flax import nnx
from pydantic import Field, model_validator

from data import rewards as rewards_lib
from train.config import RolloutConfig, TaskConfig, TrainStageConfig
from train.loop import (
    evaluate,
    init_optimizer,
    init_params,
    make_eval_step,
    make_train_step,
    put_batch,
    train_loop,
)
from train.losses import full_kl
from train.mesh import batch_sharding
from train.rollout import (
    encode_prompts,
    generate,
    require_single_process,
    sequence_batch,
    step_examples,
    task_accuracy,
    task_examples,
)


class Config(TrainStageConfig):
    kind: Literal["onpolicy_distill"]
    data: None = None
    """not used: batches are rollouts (rollout.prompts_per_step x samples_per_prompt)"""
    teacher: str
    """a training stage whose final model scores the student's tokens (same vocabulary)"""
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=1)
    """how the student samples its responses (and the held-out greedy answers)"""
    divergence: Literal["forward", "reverse", "jsd"] = "reverse"
    """KL(teacher||student), KL(student||teacher) or GKD's generalised JSD(beta)"""
    beta: float = Field(0.5, gt=0, lt=1)
    """jsd only: the teacher's weight in the mixture (near 0 ~ forward, near 1 ~ reverse KL)"""
    on_policy_fraction: float = Field(1.0, ge=0, le=1)
    """GKD's lambda: the share of steps on the student's samples; the rest use the dataset's
    reference responses (supervised KD)"""
    temperature: float = Field(1.0, gt=0)
    """loss temperature: softens both distributions; the loss is multiplied by T^2"""
    rewards: dict[str, float] = {"math_exact": 1.0}
    """verifiable rewards that score held-out greedy answers (accuracy); {} skips generation"""

    @model_validator(mode="after")
    def _rewards(self):
        errors = rewards_lib.check_reward_names([r for r in self.rewards if r != "reward_model"])
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def batch_rows(self) -> tuple[str, int]:
        ro = self.rollout
        return (
            "rollout.prompts_per_step x samples_per_prompt",
            ro.prompts_per_step * ro.samples_per_prompt,
        )

    def references(self) -> dict[str, str]:
        return {**super().references(), "teacher": self.teacher}

    def check(self, *, name, stages, models) -> list[str]:
        if self.teacher in stages and not hasattr(stages[self.teacher], "model"):
            return [f"teacher: stage {self.teacher!r} has no model"]
        t_model = getattr(stages.get(self.teacher), "model", None)
        if t_model in models and self.model in models:
            tv, sv = models[t_model].vocab_size, models[self.model].vocab_size
            if tv != sv:
                return [
                    f"model: the student's vocab_size {sv} differs from the teacher's ({tv}, "
                    f"models.{t_model}); the teacher scores the student's tokens over one "
                    "vocabulary"
                ]
        return []


def is_on_policy(*, seed: int, step: int, fraction: float) -> bool:
    """Whether (1-based) step `step` trains on the student's samples: a pure function of
    (seed, step), so a resumed stage makes the same choice."""
    return bool(np.random.default_rng([seed, step]).random() < fraction)


def make_loss(cfg: Config, *, teacher_graphdef):
    """loss_fn(model, batch, rng, teacher_params) for the train step (see train/loop.py): the
    chosen divergence between teacher and student over the full vocabulary, summed over the
    response tokens (loss_mask). The teacher is frozen (stop_gradient)."""

    def loss_fn(model, batch, rng, teacher_params):
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = model(batch["inputs"], **kw)
        t_logits = nnx.merge(teacher_graphdef, teacher_params)(batch["inputs"], **kw)
        _, m = full_kl(
            student_logits=logits,
            teacher_logits=jax.lax.stop_gradient(t_logits),
            mask=batch["loss_mask"],
            temperature=cfg.temperature,
            divergence=cfg.divergence,
            beta=cfg.beta,
        )
        sums = {"loss": m["loss_sum"], "kl_to_teacher": m["kl_sum"], "tokens": m["tokens"]}
        return m["loss_sum"], sums

    return loss_fn


def reference_responses(examples: list[dict], *, tokenizer, max_new_tokens: int):
    """(tokens [n, max_new_tokens], lengths [n]) of the examples' responses + <end_of_turn>,
    cut to max_new_tokens (the rollout's width)."""
    from train.rollout import stop_ids

    eot = stop_ids(tokenizer)[0]
    tokens = np.full((len(examples), max_new_tokens), tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(examples), np.int32)
    for i, ex in enumerate(examples):
        ids = (tokenizer.encode(ex["response"]) + [eot])[:max_new_tokens]
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def run(cfg: Config, ctx):
    require_single_process("onpolicy_distill")
    # ---- setup: student, teacher, optimizer, prompts, resume
    model_cfg = ctx.model_config(cfg.model)
    tokenizer = ctx.tokenizer()
    mesh = ctx.mesh
    graphdef, params, shardings = init_params(
        model_cfg=model_cfg,
        init=cfg.init,
        mesh=mesh,
        rules=ctx.rules,
        seed=ctx.seed,
        artifact=ctx.artifact,
    )
    t_graphdef, t_params, t_shardings = ctx.trained_params(cfg.teacher)
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    put = lambda b: put_batch(b, on_batch)
    loss_fn = make_loss(cfg, teacher_graphdef=t_graphdef)
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(ctx.seed),
        extra_shardings=t_shardings,
    )

    def eval_loss(model, batch, rng, teacher_params):
        loss_sum, sums = loss_fn(model, batch, rng, teacher_params)
        if cfg.temperature != 1.0:  # report the manifest's kl_to_teacher at T = 1
            kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
            t_logits = nnx.merge(t_graphdef, teacher_params)(batch["inputs"], **kw)
            _, k = full_kl(
                student_logits=model(batch["inputs"], **kw),
                teacher_logits=t_logits,
                mask=batch["loss_mask"],
            )
            sums["kl_to_teacher"] = k["kl_sum"]
        return loss_sum, sums

    eval_step = make_eval_step(
        graphdef=graphdef,
        loss_fn=eval_loss,
        param_shardings=shardings,
        batch_sharding=on_batch,
        extra_shardings=t_shardings,
    )

    ro = cfg.rollout
    size = ro.prompts_per_step * ro.samples_per_prompt
    width = ro.max_prompt_len + ro.max_new_tokens  # fixed: one compiled step
    train_examples = task_examples(cfg.task, split="train", seed=ctx.seed)
    test_examples = task_examples(cfg.task, split="test", seed=ctx.seed)

    def reference_batch(examples: list[dict]) -> dict:
        prompts = encode_prompts(examples, tokenizer=tokenizer, max_prompt_len=ro.max_prompt_len)
        tokens, lengths = reference_responses(
            examples, tokenizer=tokenizer, max_new_tokens=ro.max_new_tokens
        )
        return sequence_batch(prompts, tokens, lengths, width=width, pad_id=tokenizer.pad_id)

    eval_batches = []
    for start in range(0, len(test_examples), size)[: cfg.eval.batches]:
        chunk = test_examples[start : start + size]
        batch = reference_batch(chunk + [chunk[-1]] * (size - len(chunk)))
        batch["loss_mask"][len(chunk) :] = 0.0  # padding rows: one shape, no weight
        eval_batches.append(batch)

    def run_eval(state) -> dict:
        out = evaluate(eval_step, state["params"], eval_batches, put=put, extra=t_params)
        out.pop("eval_ppl", None)  # eval_loss is a divergence, not an NLL: its exp means nothing
        if cfg.rewards:
            acc, _ = task_accuracy(
                graphdef, state["params"], test_examples, tokenizer=tokenizer,
                rollout=ro, rewards=cfg.rewards, batch_size=size,
            )  # fmt: skip
            out.update(acc)
        return out

    def step_fn(state, step):
        chunk = step_examples(train_examples, step=step, count=ro.prompts_per_step, seed=ctx.seed)
        chunk = [ex for ex in chunk for _ in range(ro.samples_per_prompt)]
        on_policy = is_on_policy(seed=ctx.seed, step=step, fraction=cfg.on_policy_fraction)
        if on_policy:
            prompts = encode_prompts(chunk, tokenizer=tokenizer, max_prompt_len=ro.max_prompt_len)
            gen = generate(
                graphdef, state["params"], prompts,
                rng=jax.random.fold_in(jax.random.key(ctx.seed), step),
                rollout=ro, tokenizer=tokenizer,
            )  # fmt: skip
            batch = sequence_batch(
                prompts, gen.tokens, gen.lengths, width=width, pad_id=tokenizer.pad_id
            )
            lengths = gen.lengths
        else:
            batch = reference_batch(chunk)
            lengths = batch["loss_mask"].sum(axis=1)
        params, opt_state, metrics = train_step(
            state["params"], state["opt_state"], put(batch), step - 1, t_params
        )
        metrics = {
            **metrics,
            "response_len": float(np.mean(lengths)),
            "on_policy": float(on_policy),
        }
        return {"params": params, "opt_state": opt_state}, metrics

    # ---- loop (train/loop.py: log, eval, checkpoint, SIGTERM, resume)
    return train_loop(
        ctx=ctx,
        cfg=cfg,
        state={"params": params, "opt_state": opt_state},
        step_fn=step_fn,
        run_eval=run_eval,
        lr_at=lr_at,
        tokens_per_step=size * width,
    )
