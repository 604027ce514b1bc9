"""rl: reinforcement learning of a policy from rewards: REINFORCE, RLOO, GRPO and J-BOND.

    stages:
      rl:
        kind: rl
        model: student
        init: {stage: sft}
        algorithm: grpo                  # grpo | rloo | reinforce | bond
        task: {name: arithmetic, options: {max_value: 20, ops: "+"}}
        rewards: {math_exact: 1.0}       # by name, weighted; also code_exec, end_of_turn,
        reward_model: null               #   reward_model (a reward_model or merge stage here)
        rollout: {prompts_per_step: 16, samples_per_prompt: 8, max_new_tokens: 8,
                  max_prompt_len: 32, temperature: 1.0}
        clip_eps: 0.2                    # ratio clip (matters when updates_per_rollout > 1)
        updates_per_rollout: 1
        kl: {coef: 0.0, estimator: k3, anchor: reference, ema_decay: 0.99}
        bond: {n: 2, beta: 0.5, anchor_decay: 0.95}
        optim: {lr: 3.0e-4, warmup_steps: 0, schedule: constant}
        steps: 100                       # rollouts

A step samples `samples_per_prompt` responses to each of `prompts_per_step` training prompts
with the KV-cache sampler, scores them, and takes `updates_per_rollout` optimizer steps on the
policy-gradient loss (`train/losses.py`):
- grpo: advantages normalised within each prompt's group (mean and std), clipped ratio;
- rloo: the leave-one-out mean of the other samples of the prompt as the baseline;
- reinforce: the batch mean reward as the baseline;
- bond: J-BOND (arXiv 2407.14622): the policy distils the Best-of-n distribution of an EMA
  anchor with the Jeffreys divergence: the NLL of the anchor's best-of-n sample (forward KL)
  plus a REINFORCE term on its own samples whose reward is log of the anchor's reward quantile
  (backward KL); the anchor then moves toward the policy, and the process repeats.
The KL penalty (kl.coef) is to the frozen init (`anchor: reference`) or to an EMA of the policy
(`anchor: ema`, WARP's first idea). The EMA anchor is part of the checkpointed state and the
sampler's key is folded from the step, so a killed stage resumes exactly. Held-out evaluation
reports greedy `accuracy` and `accuracy_sampled` (one sample per prompt at the rollout
temperature); `accuracy_init` is the initial policy's, for before/after in the report.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field, model_validator

from data import rewards as rewards_lib
from train.config import RolloutConfig, Strict, TaskConfig, TrainStageConfig
from train.loop import (
    init_optimizer,
    init_params,
    make_train_step,
    put_batch,
    train_loop,
)
from train.losses import (
    bond_log_cdf,
    group_advantages,
    jbond_loss,
    policy_gradient_loss,
    token_logprobs,
)
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


class KLConfig(Strict):
    coef: float = Field(0.0, ge=0)
    """weight of the per-token KL penalty to the anchor (0: none)"""
    estimator: Literal["k1", "k3"] = "k3"
    anchor: Literal["reference", "ema"] = "reference"
    """reference: the frozen init policy; ema: an exponential moving average of the policy"""
    ema_decay: float = Field(0.99, ge=0, lt=1)


class BondConfig(Strict):
    n: int = Field(2, ge=2)
    """Best-of-n of the anchor (J-BOND uses 2)"""
    beta: float = Field(0.5, ge=0, le=1)
    """weight of the forward KL in the Jeffreys divergence (1 - beta on the backward KL)"""
    anchor_decay: float = Field(0.95, ge=0, lt=1)
    """the EMA anchor's decay per step"""


class Config(TrainStageConfig):
    kind: Literal["rl"]
    data: None = None
    """not used: batches are rollouts (rollout.prompts_per_step x samples_per_prompt)"""
    algorithm: Literal["grpo", "rloo", "reinforce", "bond"] = "grpo"
    task: TaskConfig = TaskConfig()
    rewards: dict[str, float] = {"math_exact": 1.0}
    """reward names and weights; the total is their weighted sum"""
    reward_options: dict[str, dict] = {}
    """per-reward options, e.g. {code_exec: {timeout_s: 2}}"""
    reward_model: str | None = None
    """a reward_model (or merge of reward models) stage: needed for the reward_model reward"""
    rollout: RolloutConfig = RolloutConfig()
    clip_eps: float | None = Field(0.2, gt=0)
    updates_per_rollout: int = Field(1, ge=1)
    std_normalize: bool = True
    """grpo: divide advantages by the group's reward std"""
    kl: KLConfig = KLConfig()
    bond: BondConfig = BondConfig()

    @model_validator(mode="after")
    def _consistent(self):
        errors = rewards_lib.check_reward_names(self.rewards)
        if not self.rewards:
            errors.append("rewards: name at least one reward")
        if ("reward_model" in self.rewards) != (self.reward_model is not None):
            errors.append("the reward_model reward and the reward_model stage go together")
        if self.algorithm == "rloo" and self.rollout.samples_per_prompt < 2:
            errors.append("rloo needs rollout.samples_per_prompt >= 2")
        if self.algorithm == "grpo" and self.rollout.samples_per_prompt < 2:
            errors.append("grpo needs rollout.samples_per_prompt >= 2 (advantages are per group)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def batch_rows(self) -> tuple[str, int]:
        ro = self.rollout
        rows = ro.prompts_per_step * (ro.samples_per_prompt + (self.algorithm == "bond"))
        return "rollout.prompts_per_step x samples_per_prompt (+1 for bond)", rows

    def references(self) -> dict[str, str]:
        refs = super().references()
        if self.reward_model:
            refs["reward_model"] = self.reward_model
        return refs


def make_loss(cfg: Config, *, graphdef):
    """loss_fn(model, batch, rng, anchor_params) for the train step (train/loop.py)."""

    def logprobs_of(model, batch):
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        return token_logprobs(logits=model(batch["inputs"], **kw), targets=batch["targets"])

    def anchor_logprobs(anchor, batch):
        lp = logprobs_of(nnx.merge(graphdef, anchor), batch)
        return jax.lax.stop_gradient(lp)

    def pg_loss(model, batch, rng, anchor):
        lp = logprobs_of(model, batch)
        ref = anchor_logprobs(anchor, batch) if anchor is not None else None
        _, m = policy_gradient_loss(
            logprobs=lp,
            old_logprobs=batch["old_logprobs"],
            advantages=batch["advantages"][:, 0],
            mask=batch["loss_mask"],
            ref_logprobs=ref,
            clip_eps=cfg.clip_eps,
            kl_coef=cfg.kl.coef,
            kl_estimator=cfg.kl.estimator,
        )
        sums = {"loss": m["loss_sum"], "kl": m["kl_sum"], "clip_frac": m["clip_frac_sum"]}
        return m["loss_sum"], {**sums, "tokens": m["tokens"]}

    def bond_loss(model, batch, rng, anchor):
        lp = logprobs_of(model, batch)
        is_sample = batch["is_sample"]  # [rows, 1]
        _, m = jbond_loss(
            best_logprobs=lp,
            best_mask=batch["loss_mask"] * (1.0 - is_sample),
            sample_logprobs=lp,
            sample_anchor_logprobs=anchor_logprobs(anchor, batch),
            sample_mask=batch["loss_mask"] * is_sample,
            sample_log_cdf=batch["log_cdf"][:, 0],
            n=cfg.bond.n,
            beta=cfg.bond.beta,
        )
        sums = {"loss": m["loss_sum"], "kl": m["kl_anchor_sum"], "bond_fwd": m["fwd_sum"]}
        return m["loss_sum"], {**sums, "tokens": m["tokens"]}

    return bond_loss if cfg.algorithm == "bond" else pg_loss


def run(cfg: Config, ctx):
    require_single_process("rl")
    # ---- setup: policy, anchor, optimizer, prompts, rewards
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
    updates = cfg.updates_per_rollout
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps * updates, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    put = lambda b: put_batch(b, on_batch)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)
    bond = cfg.algorithm == "bond"
    ema_anchor = bond or (cfg.kl.coef > 0 and cfg.kl.anchor == "ema")
    ref_anchor = not bond and cfg.kl.coef > 0 and cfg.kl.anchor == "reference"
    decay = cfg.bond.anchor_decay if bond else cfg.kl.ema_decay
    ema = jax.jit(
        lambda a, p: jax.tree.map(lambda x, y: decay * x + (1.0 - decay) * y, a, p),
        out_shardings=shardings,
        donate_argnums=0,
    )
    init_copy = copy(params)  # the initial policy: KL reference, and accuracy_init
    state = {"params": params, "opt_state": opt_state}
    if ema_anchor:
        state["anchor"] = copy(params)
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=make_loss(cfg, graphdef=graphdef),
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(ctx.seed),
        extra_shardings=shardings if (ema_anchor or ref_anchor) else None,
    )

    train_examples = task_examples(cfg.task, split="train", seed=ctx.seed)
    test_examples = task_examples(cfg.task, split="test", seed=ctx.seed)
    extra_rewards = {}
    if cfg.reward_model:
        from recipes.reward_model import make_scorer

        extra_rewards["reward_model"] = make_scorer(
            ctx=ctx, stage=cfg.reward_model, tokenizer=tokenizer,
            seq_len=cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens, batch_size=32,
        )  # fmt: skip
    ro = cfg.rollout
    width = ro.max_prompt_len + ro.max_new_tokens
    group = ro.samples_per_prompt
    eval_batch = ro.prompts_per_step * group

    def score(examples, completions):
        return rewards_lib.compute_rewards(
            specs=cfg.rewards, examples=examples, completions=completions,
            extra=extra_rewards, options=cfg.reward_options,
        )  # fmt: skip

    def accuracy(params, prefix=""):
        """Greedy accuracy, and the mean over `samples_per_prompt` samples per held-out prompt
        at the rollout temperature (what the policy is trained to raise; less noisy)."""
        kw = dict(tokenizer=tokenizer, rollout=ro, rewards=cfg.rewards, batch_size=eval_batch)
        greedy, rows = task_accuracy(graphdef, params, test_examples, prefix=prefix, **kw)
        repeated = [ex for ex in test_examples for _ in range(group)]
        sampled, _ = task_accuracy(graphdef, params, repeated, greedy=False, **kw)
        return {**greedy, f"{prefix}accuracy_sampled": sampled["accuracy"]}, rows

    initial, _ = accuracy(init_copy)
    initial = {f"{k}_init": v for k, v in initial.items() if k.startswith("accuracy")}
    if not ref_anchor:
        del init_copy
    last_samples: list[list] = []

    def rollout_batch(state, step):
        """Host side of a step: prompts, samples, rewards -> the device batch + metrics."""
        examples = step_examples(
            train_examples, step=step, count=ro.prompts_per_step, seed=ctx.seed
        )
        prompts = encode_prompts(examples, tokenizer=tokenizer, max_prompt_len=ro.max_prompt_len)
        key = jax.random.fold_in(jax.random.key(ctx.seed + 1), step)
        rep = lambda xs, k: [x for x in xs for _ in range(k)]
        out = generate(
            graphdef, state["params"], rep(prompts, group), rng=key, rollout=ro, tokenizer=tokenizer
        )
        total, parts = score(rep(examples, group), out.completions)
        host = {"reward_mean": float(total.mean()), "reward_std": float(total.std())}
        host.update({f"reward_{k}": float(v.mean()) for k, v in parts.items()})
        host["response_len"] = float(out.lengths.mean())
        shown = zip(rep(examples, group)[:8], out.completions[:8], total[:8], strict=True)
        last_samples[:] = [[ex["prompt"], c, float(r)] for ex, c, r in shown]
        if not bond:
            batch = sequence_batch(
                out.prompts, out.tokens, out.lengths, width=width, pad_id=tokenizer.pad_id,
                logprobs=out.logprobs,
            )  # fmt: skip
            adv = group_advantages(
                rewards=jnp.asarray(total.reshape(-1, group)),
                method=cfg.algorithm,
                std_normalize=cfg.std_normalize,
            )
            batch["advantages"] = np.asarray(adv).reshape(-1, 1)  # [rows, 1]: batch-sharded
            return batch, host
        # J-BOND: n anchor samples per prompt; the best is the forward-KL target, and they give
        # the reward quantile of each policy sample
        n = cfg.bond.n
        a_out = generate(
            graphdef, state["anchor"], rep(prompts, n), rng=jax.random.fold_in(key, 1),
            rollout=ro, tokenizer=tokenizer,
        )  # fmt: skip
        a_total, _ = score(rep(examples, n), a_out.completions)
        a_rewards = a_total.reshape(-1, n)
        best = a_rewards.argmax(axis=1) + n * np.arange(len(prompts))
        log_cdf = bond_log_cdf(sample_rewards=total, anchor_rewards=np.repeat(a_rewards, group, 0))
        host["anchor_reward_mean"] = float(a_total.mean())
        host["best_of_n_reward"] = float(a_rewards.max(axis=1).mean())
        tokens = np.concatenate([a_out.tokens[best], out.tokens])
        lengths = np.concatenate([a_out.lengths[best], out.lengths])
        batch = sequence_batch(
            prompts + out.prompts, tokens, lengths, width=width, pad_id=tokenizer.pad_id
        )
        k = len(prompts)
        batch["is_sample"] = np.r_[np.zeros(k), np.ones(len(out.prompts))][:, None]
        batch["log_cdf"] = np.r_[np.zeros(k), log_cdf][:, None]
        return batch, host

    def step_fn(state, step):
        batch, host = rollout_batch(state, step)
        batch = put(
            {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in batch.items()}
        )
        anchor = state.get("anchor", init_copy if ref_anchor else None)
        params, opt_state = state["params"], state["opt_state"]
        for u in range(updates):
            params, opt_state, metrics = train_step(
                params, opt_state, batch, (step - 1) * updates + u, anchor
            )
        new = {"params": params, "opt_state": opt_state}
        if ema_anchor:
            new["anchor"] = ema(state["anchor"], params)
        return new, {**metrics, **host}

    def on_log(step, state, logger):
        logger.log_table("samples", ["prompt", "completion", "reward"], last_samples, step)

    # ---- loop (train/loop.py: log, eval, checkpoint, SIGTERM, resume)
    return train_loop(
        ctx=ctx,
        cfg=cfg,
        state=state,
        step_fn=step_fn,
        run_eval=lambda state: accuracy(state["params"])[0],
        lr_at=lambda s: lr_at(s * updates),
        tokens_per_step=eval_batch * width,
        on_log=on_log,
        end_metrics=lambda: initial,
    )
