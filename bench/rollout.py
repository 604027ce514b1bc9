"""Sampler throughput (prefill and decode) and where the time of one RL step goes.

    PYTHONPATH=. .venv/bin/python bench/rollout.py [--json PATH] [--quick] [--preset NAME]
        [--repeats N] [--rl-steps N] [--cache-dir DIR]

Everything runs through the functions the stages use, with no benchmark-only fast path. The
model is `--preset` (default gemma3-tiny: 2M parameters, vocab 4096), random init (seeded),
float32, one device, made by `train.loop.init_params` as the stages make it.

(1) Sampler throughput: `train.sampler.sample` (one jitted prefill + while_loop decode over the
KV cache) on random prompt tokens, 64 prompt tokens and 64 new tokens, at batch 1 and 32,
temperature 1, no top-k / top-p, no stop tokens (so every row decodes all 64 tokens).
  prefill: the time of sample(..., max_new_tokens=1), which is the prefill forward over the
           prompt plus the sampling of one token (no decode step runs); prefill tokens/s =
           batch * prompt_len / that time.
  decode:  (time(max_new_tokens=64) - time(max_new_tokens=1)) / 63 per decode step, one token
           per row; decode tokens/s = batch / that. The two calls run back to back in each
           round and the difference is taken per round, then the median over rounds, so that
           both sides of a difference see the same machine load. The 64-token program's KV
           cache holds 128 positions against the 1-token program's 65, so its prefill is a
           little dearer; that error (a few attention columns of one forward pass) lands on
           decode, which makes decode look slightly slower than it is.
Each program is compiled by a first call and warmed up by one more; then `--repeats` rounds
(default 7; at least 5) run every call once, in a rotated order, each ending in
`jax.block_until_ready`.

(2) The RL step split: the GRPO step of `recipes/rl.py` at its default rollout (16 prompts x
8 samples = 128 rows, max_prompt_len 48, 16 new tokens, temperature 1): the stage's own
`make_loss` and `Config`, `train.loop.make_train_step` / `init_optimizer`, the mesh of
`train.mesh.make_mesh(MeshConfig())`. One step, as the stage's `step_fn` runs it, is timed in
four parts:
  rollout: `train.rollout.generate` (sample, device_get, decode the completions to text) on
           arithmetic prompts (`data/tasks.py`) encoded by `train.rollout.encode_prompts`;
  rewards: `data.rewards.compute_rewards` with math_exact;
  batch:   `train.rollout.sequence_batch` + `train.losses.group_advantages` + `put_batch`;
  update:  the train step, ending in `jax.block_until_ready`.
The step count goes on (new prompts and sampler keys every step, as in the stage); 2 warm-up
steps (the first compiles), then `--rl-steps` timed steps (default 5); each part reports its
median, and the fractions are each part's median over the sum of the medians. A random-init
policy almost never samples <end_of_turn> (2 stop ids out of 4096), so every response runs the
full 16 tokens: the rollout share is that of the longest responses, the early-RL worst case.
The tokenizer is the quickstart's BPE (kjv, 4096), trained once and cached in `--cache-dir`.

Prints a table; `--json PATH` also writes the numbers with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.rewards import compute_rewards
from data.tokenizer import load_tokenizer
from recipes.rl import Config as RLConfig
from recipes.rl import make_loss
from train.config import InitConfig
from train.loop import init_optimizer, init_params, make_train_step, put_batch
from train.losses import group_advantages
from train.mesh import MeshConfig, batch_sharding, make_mesh
from train.models.presets import get_preset
from train.rollout import encode_prompts, generate, sequence_batch, step_examples, task_examples
from train.sampler import sample

PROMPT_LEN, NEW_TOKENS = 64, 64
BATCHES = (1, 32)
WARMUP = 1
RL_WARMUP = 2
SEED = 0

RL_CONFIG = {
    "kind": "rl",
    "model": "m",
    "algorithm": "grpo",
    "task": {"name": "arithmetic", "options": {"max_value": 20, "ops": "+"}},
    "rewards": {"math_exact": 1.0},
    "rollout": {"prompts_per_step": 16, "samples_per_prompt": 8, "max_new_tokens": 16},
    "optim": {"lr": 3.0e-4, "warmup_steps": 0, "schedule": "constant"},
    "steps": 100,
}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
    }


def model_params(preset: str, mesh, rules):
    """(model config, graphdef, params): the preset in float32, random init from SEED."""
    cfg = get_preset(preset, param_dtype="float32", compute_dtype="float32")
    graphdef, params, _ = init_params(
        model_cfg=cfg, init=InitConfig(), mesh=mesh, rules=rules, seed=SEED
    )
    return cfg, graphdef, params


# ---------------------------------------------------------------------------------------------
# (1) sampler throughput


def sampler_throughput(preset: str, *, repeats: int, mesh, rules) -> dict:
    cfg, graphdef, params = model_params(preset, mesh, rules)
    model = nnx.merge(graphdef, params)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    rng = np.random.default_rng(SEED)

    def call(batch: int, new: int, prompts: np.ndarray):
        def once() -> None:
            out = sample(model, prompts, max_new_tokens=new, rng=jax.random.key(1))
            jax.block_until_ready(out)

        return once

    calls = {}
    for b in BATCHES:
        prompts = rng.integers(3, cfg.vocab_size, (b, PROMPT_LEN), dtype=np.int32)
        calls[(b, 1)] = call(b, 1, prompts)
        calls[(b, NEW_TOKENS)] = call(b, NEW_TOKENS, prompts)
    first = {}
    for key, once in calls.items():
        t0 = time.perf_counter()
        once()
        first[key] = time.perf_counter() - t0
        for _ in range(WARMUP):
            once()
        print(f"  compiled batch {key[0]}, {key[1]} new tokens ({first[key]:.1f} s)", flush=True)
    times: dict = {k: [] for k in calls}
    diffs: dict = {b: [] for b in BATCHES}
    order = list(BATCHES)
    for r in range(repeats):
        for b in order[r % len(order) :] + order[: r % len(order)]:
            # the pair back to back, its order alternating, so a difference shares the load
            pair = [(b, 1), (b, NEW_TOKENS)]
            if r % 2:
                pair.reverse()
            got = {}
            for key in pair:
                t0 = time.perf_counter()
                calls[key]()
                got[key] = time.perf_counter() - t0
                times[key].append(got[key])
            diffs[b].append((got[(b, NEW_TOKENS)] - got[(b, 1)]) / (NEW_TOKENS - 1))
    out = {"preset": preset, "params": n_params, "prompt_len": PROMPT_LEN,
           "new_tokens": NEW_TOKENS, "repeats": repeats, "rows": []}  # fmt: skip
    for b in BATCHES:
        t1 = statistics.median(times[(b, 1)])
        tn = statistics.median(times[(b, NEW_TOKENS)])
        step = statistics.median(diffs[b])
        out["rows"].append(
            {
                "batch": b,
                "first_call_s": first[(b, NEW_TOKENS)],
                "prefill_s": t1,
                "prefill_tokens_per_s": b * PROMPT_LEN / t1,
                "full_s": tn,
                "decode_step_s": step,
                "decode_tokens_per_s": b / step,
                "decode_step_spread_s": [min(diffs[b]), max(diffs[b])],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# (2) the RL step split


def rl_step_split(preset: str, *, steps: int, cache_dir: str) -> dict:
    cfg = RLConfig.model_validate(RL_CONFIG)
    mesh_cfg = MeshConfig()
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.logical_rules()
    tokenizer = load_tokenizer(kind="bpe", train_on="kjv", vocab_size=4096, cache_dir=cache_dir)
    model_cfg = get_preset(preset, param_dtype="float32", compute_dtype="float32")
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"preset {preset} has vocab {model_cfg.vocab_size} < the tokenizer's")
    graphdef, params, shardings = init_params(
        model_cfg=model_cfg, init=cfg.init, mesh=mesh, rules=rules, seed=SEED
    )
    tx, opt_state, opt_shardings, _ = init_optimizer(
        optim=cfg.optim, total_steps=cfg.steps, params=params, shardings=shardings
    )
    on_batch = batch_sharding(mesh)
    train_step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=make_loss(cfg, graphdef=graphdef),
        grad_accum=cfg.optim.grad_accum,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        batch_sharding=on_batch,
        rng=jax.random.key(SEED),
        extra_shardings=None,  # grpo, kl.coef 0: no anchor
    )
    examples_all = task_examples(cfg.task, split="train", seed=SEED)
    ro = cfg.rollout
    width, group = ro.max_prompt_len + ro.max_new_tokens, ro.samples_per_prompt
    rep = lambda xs, k: [x for x in xs for _ in range(k)]
    state = {"params": params, "opt_state": opt_state}
    parts: dict[str, list[float]] = {"rollout": [], "rewards": [], "batch": [], "update": []}
    host: dict[str, list[float]] = {"reward_mean": [], "response_len": [], "loss": []}

    def one_step(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = step_examples(examples_all, step=step, count=ro.prompts_per_step, seed=SEED)
        prompts = encode_prompts(examples, tokenizer=tokenizer, max_prompt_len=ro.max_prompt_len)
        key = jax.random.fold_in(jax.random.key(SEED + 1), step)
        out = generate(
            graphdef, state["params"], rep(prompts, group), rng=key, rollout=ro,
            tokenizer=tokenizer,
        )  # fmt: skip
        t1 = time.perf_counter()
        total, _ = compute_rewards(
            specs=cfg.rewards, examples=rep(examples, group), completions=out.completions,
            options=cfg.reward_options,
        )  # fmt: skip
        t2 = time.perf_counter()
        batch = sequence_batch(
            out.prompts, out.tokens, out.lengths, width=width, pad_id=tokenizer.pad_id,
            logprobs=out.logprobs,
        )  # fmt: skip
        adv = group_advantages(
            rewards=jnp.asarray(total.reshape(-1, group)),
            method=cfg.algorithm,
            std_normalize=cfg.std_normalize,
        )
        batch["advantages"] = np.asarray(adv).reshape(-1, 1)
        batch = put_batch(
            {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in batch.items()},
            on_batch,
        )
        jax.block_until_ready(batch)
        t3 = time.perf_counter()
        state["params"], state["opt_state"], metrics = train_step(
            state["params"], state["opt_state"], batch, step - 1, None
        )
        jax.block_until_ready((state["params"], state["opt_state"], metrics))
        t4 = time.perf_counter()
        host["reward_mean"].append(float(total.mean()))
        host["response_len"].append(float(out.lengths.mean()))
        host["loss"].append(float(jax.device_get(metrics["loss"])))
        return {"rollout": t1 - t0, "rewards": t2 - t1, "batch": t3 - t2, "update": t4 - t3}

    first = None
    for s in range(1, RL_WARMUP + 1):
        t = one_step(s)
        first = first or t
        print(f"  warm-up RL step {s}: {sum(t.values()):.2f} s", flush=True)
    for s in range(RL_WARMUP + 1, RL_WARMUP + steps + 1):
        t = one_step(s)
        for k, v in t.items():
            parts[k].append(v)
        print(
            f"  RL step {s}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in parts.items()}
    step_s = sum(med.values())
    if not all(np.isfinite(host["loss"])):
        raise RuntimeError(f"non-finite RL loss in the benchmark: {host['loss']}")
    return {
        "config": cfg.model_dump(),
        "rows": ro.prompts_per_step * group,
        "width": width,
        "steps": steps,
        "first_step_s": first,
        "median_s": med,
        "all_s": parts,
        "step_s": step_s,
        "fractions": {k: v / step_s for k, v in med.items()},
        "response_len_mean": float(np.mean(host["response_len"])),
        "reward_mean": float(np.mean(host["reward_mean"])),
        "rollout_tokens_per_s": ro.prompts_per_step * group * ro.max_new_tokens / med["rollout"],
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="5 rounds and 5 RL steps")
    parser.add_argument("--preset", default="gemma3-tiny", help="model preset (random init)")
    parser.add_argument("--repeats", type=int, default=None, help="sampler rounds (default 7)")
    parser.add_argument("--rl-steps", type=int, default=None, help="timed RL steps (default 5)")
    parser.add_argument("--cache-dir", default="runs/cache/bench", help="BPE tokenizer cache")
    args = parser.parse_args()
    repeats = max(5, args.repeats or (5 if args.quick else 7))
    rl_steps = max(1, args.rl_steps or 5)
    t_start = time.perf_counter()
    out: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_start": loadavg(),
    }
    print(f"{out['machine']}\nload average at start: {out['loadavg_start']}", flush=True)
    mesh_cfg = MeshConfig(data=-1)
    mesh = make_mesh(mesh_cfg, devices=jax.devices()[:1])

    print(f"sampler throughput ({args.preset}, float32)", flush=True)
    sm = sampler_throughput(args.preset, repeats=repeats, mesh=mesh, rules=mesh_cfg.logical_rules())
    out["sampler"] = sm
    print("RL step split (GRPO, 16 prompts x 8 samples, 16 new tokens)", flush=True)
    rl = rl_step_split(args.preset, steps=rl_steps, cache_dir=args.cache_dir)
    out["rl"] = rl
    out["loadavg_end"] = loadavg()
    out["total_runtime_s"] = time.perf_counter() - t_start

    by_b = {r["batch"]: r for r in sm["rows"]}
    for b in BATCHES:
        out[f"prefill_tokens_per_s_b{b}"] = by_b[b]["prefill_tokens_per_s"]
        out[f"decode_tokens_per_s_b{b}"] = by_b[b]["decode_tokens_per_s"]
    out["rl_step_s"] = rl["step_s"]
    for part, key in (("rollout", "rollout"), ("rewards", "reward"), ("batch", "batch"),
                      ("update", "update")):  # fmt: skip
        out[f"rl_{key}_fraction"] = rl["fractions"][part]

    print(
        f"\n{args.preset} ({sm['params'] / 1e6:.2f}M params), float32, prompt {PROMPT_LEN} "
        f"tokens, {NEW_TOKENS} new, median of {repeats} rounds"
    )
    print(
        f"  {'batch':>5s} {'prefill ms':>10s} {'prefill tok/s':>13s} {'decode ms/step':>14s} "
        f"{'decode tok/s':>12s} {'64-token call ms':>16s} {'first call s':>12s}"
    )
    for r in sm["rows"]:
        print(
            f"  {r['batch']:5d} {r['prefill_s'] * 1e3:10.1f} {r['prefill_tokens_per_s']:13,.0f} "
            f"{r['decode_step_s'] * 1e3:14.2f} {r['decode_tokens_per_s']:12,.0f} "
            f"{r['full_s'] * 1e3:16.1f} {r['first_call_s']:12.1f}"
        )
    print(
        f"\nRL step (GRPO, {rl['rows']} rows = 16 prompts x 8, width {rl['width']}), median of "
        f"{rl['steps']} steps; mean response {rl['response_len_mean']:.1f} tokens"
    )
    print(f"  {'part':8s} {'median ms':>10s} {'fraction':>9s}")
    for k in ("rollout", "rewards", "batch", "update"):
        print(f"  {k:8s} {rl['median_s'][k] * 1e3:10.1f} {rl['fractions'][k]:9.1%}")
    print(f"  {'step':8s} {rl['step_s'] * 1e3:10.1f} {1.0:9.1%}")
    print(
        f"  rollout: {rl['rollout_tokens_per_s']:,.0f} generated tokens/s; first step (compiles) "
        f"{sum(rl['first_step_s'].values()):.1f} s"
    )
    print(f"\nload average {out['loadavg_start']} -> {out['loadavg_end']}; "
          f"total {out['total_runtime_s']:.0f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    from train.allocator import use_fast_allocator

    use_fast_allocator()  # as launch.py does: mimalloc on a CPU-only host
    main()
