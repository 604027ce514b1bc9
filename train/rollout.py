"""What the post-training stages share: task prompts, rollouts with the sampler, sequence batches
of prompt + response, and task accuracy.

A rollout continues chat prompts (`data/tasks.py`: BOS, the user turn, the model's header) with
`train/sampler.py` (one jitted prefill + decode loop over a KV cache), stopping at
<end_of_turn>. `sequence_batch` lays each prompt + response out as one packed-format row (the
batch dict every loss in `train/` reads) with the loss mask on the response tokens only, and
the sampler's log-probs of those tokens aligned to the targets (the behaviour policy of an
importance ratio). Prompts of step s are a pure function of (seed, s), so a resumed stage draws
exactly the prompts the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from data import tasks
from data.tokenizer import END_OF_TURN
from train.sampler import sample


def require_single_process(kind: str) -> None:
    """Post-training stages build each global batch whole on the host (rollouts, chat rows):
    refuse a multi-process job clearly instead of failing inside jax."""
    if jax.process_count() > 1:
        raise NotImplementedError(
            f"stage kind {kind!r} runs in a single process for now (this job has "
            f"{jax.process_count()}); run the pretraining stages multi-host and post-train on "
            "one host (any number of its devices)"
        )


def task_examples(task, *, split: str, seed: int) -> list[dict]:
    """The examples of a TaskConfig's split (train: train_size, test: test_size)."""
    n = task.train_size if split == "train" else task.test_size
    return tasks.make_task(task.name, split=split, n=n, seed=seed, **task.options)


def step_examples(examples: list[dict], *, step: int, count: int, seed: int) -> list[dict]:
    """The `count` examples of (1-based) step `step`: shuffled epochs, a pure function of step."""
    n = len(examples)
    orders: dict[int, np.ndarray] = {}  # a step spans at most a few epochs: draw each once
    out = []
    for k in range((step - 1) * count, step * count):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(examples[int(orders[epoch][i])])
    return out


def stop_ids(tokenizer) -> tuple[int, ...]:
    return (tokenizer.token_to_id(END_OF_TURN), tokenizer.eos_id)


def encode_prompts(examples: list[dict], *, tokenizer, max_prompt_len: int) -> list[list[int]]:
    out = []
    for ex in examples:
        ids = tasks.prompt_ids(prompt=ex["prompt"], tokenizer=tokenizer)
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"rollout.max_prompt_len is {max_prompt_len} but prompt {ex.get('id', '')!r} "
                f"is {len(ids)} tokens; raise rollout.max_prompt_len"
            )
        out.append(ids)
    return out


@dataclass
class Rollout:
    prompts: list[list[int]]
    tokens: np.ndarray  # int32 [n, max_new_tokens], pad after the stop token
    lengths: np.ndarray  # int32 [n], including the stop token
    logprobs: np.ndarray  # float32 [n, max_new_tokens]: log p(token) under the sampling params
    completions: list[str]  # decoded, up to the stop token


def generate(
    graphdef,
    params,
    prompts: list[list[int]],
    *,
    rng: jax.Array,
    rollout,
    tokenizer,
    greedy: bool = False,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for a group) with the KV-cache sampler."""
    out = sample(
        nnx.merge(graphdef, params),
        prompts,
        max_new_tokens=rollout.max_new_tokens,
        rng=rng,
        temperature=rollout.temperature,
        top_k=rollout.top_k,
        top_p=rollout.top_p,
        greedy=greedy,
        stop_tokens=stop_ids(tokenizer),
        pad_id=tokenizer.pad_id,
        max_prompt_len=rollout.max_prompt_len,
    )
    tokens, lengths, logprobs = jax.device_get((out.tokens, out.lengths, out.logprobs))
    completions = [
        tasks.completion_text(ids=row[:n], tokenizer=tokenizer)
        for row, n in zip(tokens, lengths, strict=True)
    ]
    return Rollout(
        prompts, np.asarray(tokens), np.asarray(lengths), np.asarray(logprobs), completions
    )


def sequence_batch(
    prompts: list[list[int]],
    tokens: np.ndarray,
    lengths: np.ndarray,
    *,
    width: int,
    pad_id: int,
    logprobs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rows of prompt + response (one segment each), right-padded to `width` inputs.

    loss_mask is 1 where the target is a response token (stop token included); `old_logprobs`
    (when `logprobs` is given) holds the sampler's log-prob of that target, 0 elsewhere.
    """
    n = len(prompts)
    row = np.full((n, width + 1), pad_id, np.int32)
    resp = np.zeros((n, width + 1), np.float32)
    old = np.zeros((n, width + 1), np.float32)
    real = np.zeros((n, width), np.int32)  # inputs that are tokens (the last is only a target)
    for i, (p, toks, k) in enumerate(zip(prompts, tokens, lengths, strict=True)):
        k = int(k)
        if len(p) + k > width + 1:
            raise ValueError(f"prompt + response is {len(p) + k} tokens; the width is {width + 1}")
        row[i, : len(p)] = p
        row[i, len(p) : len(p) + k] = toks[:k]
        resp[i, len(p) : len(p) + k] = 1.0
        real[i, : len(p) + k - 1] = 1
        if logprobs is not None:
            old[i, len(p) : len(p) + k] = logprobs[i, :k]
    batch = {
        "inputs": row[:, :-1],
        "targets": row[:, 1:],
        "loss_mask": resp[:, 1:],
        "positions": np.where(real, np.arange(width, dtype=np.int32)[None], 0).astype(np.int32),
        "segment_ids": real,
    }
    if logprobs is not None:
        batch["old_logprobs"] = old[:, 1:]
    return batch


def task_accuracy(
    graphdef,
    params,
    examples: list[dict],
    *,
    tokenizer,
    rollout,
    rewards: dict,
    batch_size: int,
    greedy: bool = True,
    prefix: str = "",
) -> tuple[dict[str, float], list[list]]:
    """Responses to held-out prompts (greedy, or sampled as in rollouts with a fixed key),
    scored by the verifiable rewards.

    Returns ({"accuracy", "reward_<name>", "response_len"} with `prefix` on each key, sample
    rows for a table). accuracy is the mean of the first verifiable reward named (math_exact,
    code_exec), else of the total.
    """
    from data.rewards import compute_rewards

    verifiable = [r for r in rewards if r in ("math_exact", "code_exec")] or list(rewards)
    specs = {r: 1.0 for r in verifiable if r != "reward_model"}
    scores, lengths, rows = {k: [] for k in specs}, [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = encode_prompts(chunk, tokenizer=tokenizer, max_prompt_len=rollout.max_prompt_len)
        pad = batch_size - len(chunk)  # one compiled program: pad the last chunk
        out = generate(
            graphdef,
            params,
            prompts + [prompts[-1]] * pad,
            rng=jax.random.fold_in(jax.random.key(0), start),
            rollout=rollout,
            tokenizer=tokenizer,
            greedy=greedy,
        )
        completions = out.completions[: len(chunk)]
        _, parts = compute_rewards(specs=specs, examples=chunk, completions=completions)
        for k in specs:
            scores[k].extend(parts[k].tolist())
        lengths.extend(out.lengths[: len(chunk)].tolist())
        if start == 0:
            rows = [
                [ex["prompt"], c, ex.get("answer", "")]
                for ex, c in zip(chunk[:8], completions[:8], strict=True)
            ]
    metrics = {f"reward_{k}": float(np.mean(v)) for k, v in scores.items()}
    metrics["accuracy"] = metrics[f"reward_{verifiable[0]}"] if specs else 0.0
    metrics["response_len"] = float(np.mean(lengths))
    return {prefix + k: v for k, v in metrics.items()}, rows
