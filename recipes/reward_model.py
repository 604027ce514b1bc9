"""reward_model: a scalar-head reward model trained on preference pairs (Bradley-Terry).

WARM (arXiv 2401.12187) trains several of these from one init with other seeds or
hyperparameters, then a `merge` stage (method average) averages their weights.

    stages:
      rm_a:
        kind: reward_model
        model: student
        init: {stage: sft}
        task: {name: arithmetic, options: {max_value: 20, ops: "+"}, train_size: 2000}
        pairs: {source: corrupted}       # chosen: the reference response; rejected: the same
                                         #   response with the answer off by a nonzero offset
        # pairs: {source: jsonl, path: pairs.jsonl}   # lines {"prompt", "chosen", "rejected"}
        seed: 1                          # WARM members differ by it: head init and pair order
        data: {seq_len: 48, batch_size: 32}            # batch_size counts pairs
        optim: {lr: 1.0e-4, warmup_steps: 10}
        steps: 100
      rm_warm: {kind: merge, model: student, sources: [rm_a, rm_b], method: average}

The model is the Transformer plus a top-level `score_head` {kernel [d_model], bias []} in
float32: the score of a chat (user prompt, model response) is the final hidden state at the
response's <end_of_turn> dotted with the kernel, plus the bias. A batch holds `batch_size` pairs
as arrays [pairs, 2, seq_len] (chosen, rejected), so data parallelism and gradient accumulation
split pairs, never a pair. Batch k is a pure function of (seed, k), so a killed stage resumes
exactly. Held-out pairs (from the task's test split, or the jsonl's `test_path` / last
`task.test_size` lines) give eval_loss and eval_accuracy (pairwise: chosen scored higher).

`make_scorer(ctx=..., stage=...)` turns a finished reward_model stage, or a merge of them, into
a reward function for `data.rewards.compute_rewards(..., extra={"reward_model": fn})`.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from pydantic import Field, model_validator

from data import tasks
from data.tokenizer import END_OF_TURN, START_OF_TURN
from train.config import ChatDataConfig, Strict, TaskConfig, TrainStageConfig
from train.loop import (
    evaluate,
    init_optimizer,
    init_params,
    make_eval_step,
    make_train_step,
    put_batch,
    train_loop,
)
from train.losses import bradley_terry_loss
from train.mesh import batch_sharding, data_parallel_size
from train.models.gemma import Transformer
from train.rollout import require_single_process, task_examples


class PairsConfig(Strict):
    """Where preference pairs come from."""

    source: Literal["corrupted", "jsonl"] = "corrupted"
    """corrupted: task examples, rejected = the answer plus a nonzero offset; jsonl: a file"""
    max_offset: int = Field(10, gt=0)
    """corrupted only: offsets are drawn from +-[1, max_offset]"""
    path: str | None = None
    """jsonl only: lines {"prompt", "chosen", "rejected"} (training pairs)"""
    test_path: str | None = None
    """jsonl only: held-out pairs; default: the last task.test_size lines of `path`"""

    @model_validator(mode="after")
    def _paths(self):
        if self.source == "jsonl" and not self.path:
            raise ValueError("pairs.source 'jsonl' needs pairs.path")
        if self.source == "corrupted" and (self.path or self.test_path):
            raise ValueError("pairs.path and pairs.test_path apply to source 'jsonl' only")
        return self


class Config(TrainStageConfig):
    kind: Literal["reward_model"]
    data: ChatDataConfig = ChatDataConfig()
    task: TaskConfig = TaskConfig()
    pairs: PairsConfig = PairsConfig()
    seed: int = 0
    """folded into the head init, the corruptions and the pair order (WARM members differ by it);
    the Transformer's random init (without `init`) stays the run seed's, shared by all"""


# ---------------------------------------------------------------------------------------------
# the model: Transformer + score head


class ScoreHead(nnx.Module):
    def __init__(self, d_model: int):
        self.kernel = nnx.Param(jnp.zeros([d_model], jnp.float32))
        self.bias = nnx.Param(jnp.zeros([], jnp.float32))


class RewardModel(Transformer):
    """The Transformer with a `score_head`: its params are the Transformer's plus
    {"score_head": {"kernel", "bias"}}, so `nnx.merge(graphdef, params)` gives the scorer and
    sampling from it still works (it is a Transformer)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.score_head = ScoreHead(cfg.d_model)

    def score(self, tokens, *, positions, segment_ids, last) -> jax.Array:
        """float32 [rows]: the hidden state at index `last` [rows] of each row · kernel + bias."""
        hidden = self(tokens, positions=positions, segment_ids=segment_ids, return_hidden=True)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return h @ self.score_head.kernel[...] + self.score_head.bias[...]


def abstract_params(model_cfg, *, mesh, rules):
    """(graphdef, abstract params, shardings) of a RewardModel: the Transformer's, plus the
    score head replicated."""
    from train.loop import abstract_params as transformer_params

    _, abstract, shardings = transformer_params(model_cfg, mesh=mesh, rules=rules)
    model = nnx.eval_shape(lambda: RewardModel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    rep = NamedSharding(mesh, PartitionSpec())
    head = {"kernel": ([model_cfg.d_model], rep), "bias": ([], rep)}
    abstract = {
        **abstract,
        "score_head": {
            k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh) for k, (s, sh) in head.items()
        },
    }
    return graphdef, abstract, {**shardings, "score_head": {"kernel": rep, "bias": rep}}


def is_reward_model(pipeline, stage: str) -> bool:
    """Whether a stage's checkpoint holds a score head: a reward_model stage, or a merge whose
    (first) source is one (merge checks that its sources share one structure)."""
    st = pipeline.stages[stage]
    while st.kind == "merge":
        st = pipeline.stages[st.sources[0]]
    return st.kind == "reward_model"


# ---------------------------------------------------------------------------------------------
# pairs and rows


def _stage_seed(run_seed: int, seed: int) -> int:
    return int(np.random.SeedSequence([run_seed, seed]).generate_state(1)[0])


def corrupted_pairs(examples: list[dict], *, seed: int, max_offset: int) -> list[dict]:
    """{"prompt", "chosen", "rejected"}: chosen is the reference response, rejected the same
    response with its (integer) answer moved by an offset in +-[1, max_offset], drawn from
    (seed, example id)."""
    out = []
    for ex in examples:
        answer, response = ex.get("answer", ""), ex.get("response", "")
        if not re.fullmatch(r"-?\d+", answer.strip()) or answer.strip() not in response:
            raise ValueError(
                f"pairs.source 'corrupted' needs an integer answer that appears in the response; "
                f"example {ex.get('id', '?')!r} has answer {answer!r}, response {response!r}"
            )
        rng = np.random.default_rng([seed, zlib.crc32(str(ex.get("id", ex["prompt"])).encode())])
        offset = int(rng.integers(1, max_offset + 1)) * int(rng.choice([-1, 1]))
        a = answer.strip()
        k = response.rindex(a)
        wrong = response[:k] + str(int(a) + offset) + response[k + len(a) :]
        out.append({"prompt": ex["prompt"], "chosen": response, "rejected": wrong})
    return out


def load_pairs(path: str) -> list[dict]:
    """Pairs from a JSONL file, one {"prompt", "chosen", "rejected"} object (strings) a line;
    errors name file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from e
            keys = ("prompt", "chosen", "rejected")
            if not isinstance(record, dict) or sorted(record) != sorted(keys):
                raise ValueError(f"{path}:{lineno}: expected an object with exactly keys {keys}")
            bad = [k for k in keys if not isinstance(record[k], str)]
            if bad:
                raise ValueError(f"{path}:{lineno}: {bad} must be strings")
            out.append(record)
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


def chat_row(*, prompt: str, response: str, tokenizer, seq_len: int) -> tuple[list[int], int]:
    """(ids up to and including the response's <end_of_turn>, index of that token)."""
    ids, _ = tasks.format_chat(
        turns=[{"role": "user", "content": prompt}, {"role": "model", "content": response}],
        tokenizer=tokenizer,
    )
    eot = tokenizer.token_to_id(END_OF_TURN)
    last = max(i for i, t in enumerate(ids) if t == eot)
    if last >= seq_len:
        raise ValueError(
            f"a prompt + response is {last + 1} tokens, longer than data.seq_len={seq_len}; "
            f"raise data.seq_len (prompt {prompt[:40]!r})"
        )
    return ids[: last + 1], last


def encode_rows(chats: list[tuple[str, str]], *, tokenizer, seq_len: int) -> dict:
    """Right-padded rows [n, seq_len]: inputs, positions, segment_ids (1 on real tokens) and
    `last` [n], the index of each row's last real token."""
    n = len(chats)
    inputs = np.full([n, seq_len], tokenizer.pad_id, np.int32)
    segments = np.zeros([n, seq_len], np.int32)
    last = np.zeros([n], np.int32)
    for i, (prompt, response) in enumerate(chats):
        ids, last[i] = chat_row(
            prompt=prompt, response=response, tokenizer=tokenizer, seq_len=seq_len
        )
        inputs[i, : len(ids)] = ids
        segments[i, : len(ids)] = 1
    positions = np.where(segments > 0, np.arange(seq_len, dtype=np.int32)[None], 0)
    return {
        "inputs": inputs,
        "positions": positions.astype(np.int32),
        "segment_ids": segments,
        "last": last,
    }


def pair_rows(pairs: list[dict], *, tokenizer, seq_len: int) -> dict:
    """Arrays [pairs, 2, seq_len] (and `last` [pairs, 2]): index 0 chosen, 1 rejected."""
    chats = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    rows = encode_rows(chats, tokenizer=tokenizer, seq_len=seq_len)
    return {k: v.reshape(len(pairs), 2, *v.shape[1:]) for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# loss


def pair_loss(model, batch, rng, extra):
    """Bradley-Terry on a batch of pairs: sums of loss, accuracy, margin; tokens = pairs."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [pairs, 2, ...] -> [2 pairs, ...]
    scores = model.score(
        flat(batch["inputs"]),
        positions=flat(batch["positions"]),
        segment_ids=flat(batch["segment_ids"]),
        last=flat(batch["last"]),
    ).reshape(-1, 2)
    _, m = bradley_terry_loss(chosen=scores[:, 0], rejected=scores[:, 1])
    sums = {"loss": m["loss_sum"], "accuracy": m["accuracy_sum"], "margin": m["margin_sum"]}
    return m["loss_sum"], {**sums, "tokens": m["tokens"]}


# ---------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, ctx):
    require_single_process("reward_model")
    # ---- setup: model (Transformer + score head), optimizer, pairs, resume
    model_cfg = ctx.model_config(cfg.model)
    tokenizer = ctx.tokenizer()
    mesh = ctx.mesh
    seed = _stage_seed(ctx.seed, cfg.seed)
    graphdef, _, shardings = abstract_params(model_cfg, mesh=mesh, rules=ctx.rules)
    if cfg.init.stage and is_reward_model(ctx.pipeline, cfg.init.stage):
        _, params, _ = ctx.trained_params(cfg.init.stage)  # continue a reward model, head too
    else:
        _, params, _ = init_params(
            model_cfg=model_cfg, init=cfg.init, mesh=mesh, rules=ctx.rules, seed=ctx.seed,
            artifact=ctx.artifact,
        )  # fmt: skip
        d = model_cfg.d_model
        kernel = jax.random.normal(jax.random.key(seed), [d], jnp.float32) * d**-0.5
        head = {"kernel": kernel, "bias": jnp.zeros([], jnp.float32)}
        params = {**params, "score_head": jax.device_put(head, shardings["score_head"])}
    tx, opt_state, opt_shardings, lr_at = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    put = lambda b: put_batch(b, on_batch)  # noqa: E731
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=pair_loss,
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(seed),
    )
    eval_step = make_eval_step(
        graphdef=graphdef, loss_fn=pair_loss, param_shardings=shardings, batch_sharding=on_batch
    )

    if cfg.pairs.source == "corrupted":
        make = lambda split: corrupted_pairs(  # noqa: E731
            task_examples(cfg.task, split=split, seed=ctx.seed),
            seed=seed,
            max_offset=cfg.pairs.max_offset,
        )
        train_pairs, test_pairs = make("train"), make("test")
    else:
        train_pairs = load_pairs(cfg.pairs.path)
        if cfg.pairs.test_path:
            test_pairs = load_pairs(cfg.pairs.test_path)
        else:
            n = cfg.task.test_size
            if len(train_pairs) <= n:
                raise ValueError(
                    f"{cfg.pairs.path}: {len(train_pairs)} pairs, not more than task.test_size="
                    f"{n} to hold out; give pairs.test_path or lower task.test_size"
                )
            train_pairs, test_pairs = train_pairs[:-n], train_pairs[-n:]
    seq_len, batch_size = cfg.data.seq_len, cfg.data.batch_size
    rows = pair_rows(train_pairs, tokenizer=tokenizer, seq_len=seq_len)
    test_rows = pair_rows(test_pairs, tokenizer=tokenizer, seq_len=seq_len)
    eval_batches = [  # in order; the last batch wraps to the first pairs (as in sft)
        tasks.get_batch(test_rows, batch_size=batch_size, seed=None, index=i)
        for i in range(min(cfg.eval.batches, -(-len(test_pairs) // batch_size)))
    ]

    def run_eval(state) -> dict:
        out = evaluate(eval_step, state["params"], eval_batches, put=put)
        out.pop("eval_ppl", None)  # not a language-model loss
        out.pop("eval_tokens", None)
        out["eval_pairs"] = len(eval_batches) * batch_size
        return out

    train_batches = tasks.batch_source(rows, batch_size=batch_size, seed=seed)

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
        tokens_per_step=2 * batch_size * seq_len,
    )


# ---------------------------------------------------------------------------------------------
# the reward function for RL


def make_scorer(*, ctx, stage: str, tokenizer, seq_len: int, batch_size: int):
    """A RewardFn `fn(*, examples, completions) -> float32 [n]` from a finished reward_model
    stage (or a merge of reward models): the score of each chat (example prompt, completion as
    the model's turn). Chats are scored `batch_size` rows at a time (the last chunk padded, so
    one program compiles); batch_size must be a multiple of the data-parallel size, and a chat
    longer than seq_len tokens is an error; turn markers in a completion are dropped."""
    if not is_reward_model(ctx.pipeline, stage):
        raise ValueError(f"stage {stage!r} is not a reward_model stage (or a merge of them)")
    dp = data_parallel_size(ctx.mesh)
    if batch_size % dp:
        raise ValueError(f"scorer batch_size {batch_size} must be a multiple of {dp} (data x fsdp)")
    graphdef, params, shardings = ctx.trained_params(stage)
    on_batch = batch_sharding(ctx.mesh)

    @jax.jit
    def score(params, batch):
        model = nnx.merge(graphdef, params)
        return model.score(
            batch["inputs"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            last=batch["last"],
        )

    def fn(*, examples: list[dict], completions: list[str]) -> np.ndarray:
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        out = []
        for start in range(0, len(completions), batch_size):
            chats = [  # a sampled turn marker would be read as a control token: drop it
                (ex["prompt"], c.replace(START_OF_TURN, "").replace(END_OF_TURN, ""))
                for ex, c in zip(
                    examples[start : start + batch_size],
                    completions[start : start + batch_size],
                    strict=True,
                )
            ]
            n = len(chats)
            rows = encode_rows(
                chats + [chats[-1]] * (batch_size - n), tokenizer=tokenizer, seq_len=seq_len
            )
            out.append(np.asarray(jax.device_get(score(params, put_batch(rows, on_batch))))[:n])
        return np.concatenate(out).astype(np.float32) if out else np.zeros([0], np.float32)

    return fn
