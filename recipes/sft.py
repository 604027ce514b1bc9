"""sft: supervised fine-tuning on chat data, loss on the model's turns only (Gemma 2 §4).

    stages:
      sft:
        kind: sft
        model: student
        init: {stage: student}           # the pretrained (distilled) checkpoint
        task: {name: arithmetic, options: {max_value: 20, ops: "+"}, train_size: 2000}
        # task: {name: jsonl, options: {path: chats.jsonl}}   # prompt/response or messages
        teacher: null                    # or a stage: its greedy responses replace the
                                         #   dataset's (sequence-level distillation)
        data: {seq_len: 64, batch_size: 32}
        optim: {lr: 1.0e-3, warmup_steps: 10}
        steps: 150
        rewards: {math_exact: 1.0}       # scores held-out greedy answers (accuracy)

Examples are formatted with the Gemma chat template (`data/tasks.py`: BOS as a token, control
tokens, loss mask on model turns and their <end_of_turn>) and packed several to a row with
attention kept inside each example. Batch k is a pure function of (seed, k), so a killed stage
resumes exactly. Held-out evaluation reports the CE of the test split's responses and the
accuracy of greedy answers to its prompts.
"""

from __future__ import annotations

from typing import Literal

import jax
from pydantic import model_validator

from data import rewards as rewards_lib
from data import tasks
from recipes.pretrain import lm_loss
from train.config import ChatDataConfig, RolloutConfig, TaskConfig, TrainStageConfig
from train.loop import (
    evaluate,
    init_optimizer,
    init_params,
    make_eval_step,
    make_train_step,
    put_batch,
    train_loop,
)
from train.mesh import batch_sharding
from train.rollout import (
    encode_prompts,
    generate,
    require_single_process,
    task_accuracy,
    task_examples,
)


class Config(TrainStageConfig):
    kind: Literal["sft"]
    data: ChatDataConfig = ChatDataConfig()
    task: TaskConfig = TaskConfig()
    teacher: str | None = None
    """a training stage whose model writes the responses (sequence-level distillation)"""
    rollout: RolloutConfig = RolloutConfig()
    """how the teacher's responses and the held-out answers are generated (greedy)"""
    rewards: dict[str, float] = {"math_exact": 1.0}
    """verifiable rewards that score held-out answers (accuracy); {} skips generation"""

    @model_validator(mode="after")
    def _rewards(self):
        errors = rewards_lib.check_reward_names([r for r in self.rewards if r != "reward_model"])
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def references(self) -> dict[str, str]:
        refs = super().references()
        if self.teacher:
            refs["teacher"] = self.teacher
        return refs

    def check(self, *, name, stages, models) -> list[str]:
        if self.teacher and self.teacher in stages and not hasattr(stages[self.teacher], "model"):
            return [f"teacher: stage {self.teacher!r} has no model"]
        return []


def teacher_responses(examples, *, graphdef, params, tokenizer, rollout) -> list[dict]:
    """The examples with each response replaced by the teacher's greedy answer."""
    out, size = [], rollout.prompts_per_step * rollout.samples_per_prompt
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        prompts = encode_prompts(chunk, tokenizer=tokenizer, max_prompt_len=rollout.max_prompt_len)
        pad = [prompts[-1]] * (size - len(chunk))
        gen = generate(
            graphdef, params, prompts + pad, rng=jax.random.key(0), rollout=rollout,
            tokenizer=tokenizer, greedy=True,
        )  # fmt: skip
        out += [{**ex, "response": c} for ex, c in zip(chunk, gen.completions, strict=False)]
    return out


def run(cfg: Config, ctx):
    require_single_process("sft")
    # ---- setup: model, optimizer, chat rows, resume
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
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    put = lambda b: put_batch(b, on_batch)
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=lm_loss,
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(ctx.seed),
    )
    eval_step = make_eval_step(
        graphdef=graphdef, loss_fn=lm_loss, param_shardings=shardings, batch_sharding=on_batch
    )

    train_examples = task_examples(cfg.task, split="train", seed=ctx.seed)
    test_examples = task_examples(cfg.task, split="test", seed=ctx.seed)
    if cfg.teacher:
        t_graphdef, t_params, _ = ctx.trained_params(cfg.teacher)
        train_examples = teacher_responses(
            train_examples, graphdef=t_graphdef, params=t_params, tokenizer=tokenizer,
            rollout=cfg.rollout,
        )  # fmt: skip
    seq_len, batch_size = cfg.data.seq_len, cfg.data.batch_size
    rows = tasks.sft_rows(examples=train_examples, tokenizer=tokenizer, seq_len=seq_len)
    test_rows = tasks.sft_rows(examples=test_examples, tokenizer=tokenizer, seq_len=seq_len)
    eval_batches = [
        tasks.get_batch(test_rows, batch_size=batch_size, seed=None, index=i)
        for i in range(min(cfg.eval.batches, -(-len(test_rows["inputs"]) // batch_size)))
    ]

    def run_eval(state) -> dict:
        out = evaluate(eval_step, state["params"], eval_batches, put=put)
        if cfg.rewards:
            acc, _ = task_accuracy(
                graphdef, state["params"], test_examples, tokenizer=tokenizer,
                rollout=cfg.rollout, rewards=cfg.rewards, batch_size=batch_size,
            )  # fmt: skip
            out.update(acc)
        return out

    train_batches = tasks.batch_source(rows, batch_size=batch_size, seed=ctx.seed)

    def step_fn(state, step):
        batch = train_batches[step - 1]
        params, opt_state, metrics = train_step(
            state["params"], state["opt_state"], put(batch), step - 1, None
        )
        return {"params": params, "opt_state": opt_state}, metrics

    # ---- loop (train/loop.py: log, eval, checkpoint, SIGTERM, resume)
    return train_loop(
        ctx=ctx,
        cfg=cfg,
        state={"params": params, "opt_state": opt_state},
        step_fn=step_fn,
        run_eval=run_eval,
        lr_at=lr_at,
        tokens_per_step=batch_size * seq_len,
    )
