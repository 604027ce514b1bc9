"""Distillation benchmarks: train-step throughput, MFU, teacher sampling, store size, memory.

    PYTHONPATH=. .venv/bin/python bench/distill.py [--json PATH] [--quick] [--steps N]

Everything runs through the functions the stages use, with no benchmark-only fast path:
`train.loop.make_train_step` with `recipes.pretrain.lm_loss` (plain CE) or
`recipes.distill.make_loss` (online: the teacher's parameters are the step's `extra` and the
teacher runs inside the step; offline: the teacher's targets ride in the batch as
ids/valid/teacher_logprobs/counts [b, t, K], read back from a real logit store), and
`recipes.sample_logits.make_teacher_targets` + `data.logit_store` for the offline targets.

The setting is issue 7's comparison with Tunix 0.1.7 on this CPU: float32, batch 8 x seq 256,
vocab 8192, AdamW at lr 1e-3 (constant, no clipping), random tokens, fixed seeds, one device.
  teacher: Gemma 3, 6 layers (5 local : 1 global, window 128), d_model 512, 8 heads, 2 KV
           heads, head_dim 64, ffw 2048 (~27M parameters)
  student: Gemma 3, 4 layers all local (window 128), d_model 256, 4 heads, 1 KV head,
           head_dim 64, ffw 1024 (~6M parameters)
  online:  full_kl, forward KL, temperature 2, alpha 0.5 (Tunix's LogitStrategy defaults)
  offline: sampled_ce, K=256 draws (Gemma 3), alpha 1, T 1; targets made once by
           make_teacher_targets, written with LogitStoreWriter and read back with
           LogitStoreReader.read_rows, as the distill stage does.
Both models unrolled (`scan_layers=False`, faster on CPU at a few layers); one extra row has
the student's CE step with `scan_layers=True`.

Timing: for each timed call, the first call (compile) and 2 more are warm-up; then `--steps`
rounds run one call of each (order rotated every round), each ending in
`jax.block_until_ready`, and each call reports its median. Interleaving gives every call the
same share of whatever else the (shared) machine runs, so the ratios between calls hold up
under load even when the absolute numbers do not. Batches are put on the device before timing
(the stages put each batch with `put_batch`; on one CPU device that is a copy, timed apart,
as is the store's `read_rows`). The matmul peak is the best GFLOP/s of a jitted float32
[M, K] x [K, N]: a sweep of sizes before the rounds (fastest of several runs each), and a
2048^3 matmul inside every round.

FLOP convention (MFU = model FLOPs / s / matmul peak; "useful" FLOPs, as in PaLM's MFU):
    forward FLOPs per token = 2 N + sum over layers of 4 * heads * head_dim * kbar
    N    = every parameter, the tied embedding counted once: it is the output projection's
           matmul (the input lookup is a gather, 0 FLOPs); norm scales are included (<0.1%).
    kbar = mean keys a query attends to under the causal mask,
           (1 / T) * sum_{p=1..T} min(W, p), with W = T for global layers; 4 = QK^T + AV, 2 each.
    trained model: 3 x forward (backward = 2 x forward); forward-only model: 1 x forward.
    online distillation per token = 3 x forward(student) + 1 x forward(teacher).
Softmax, norms, the loss and the optimizer update are not counted. The attention kernel
computes the full masked [T, T] scores, so it executes more than kbar keys per query; those
extra FLOPs are not counted as useful.

Stored bytes per token: the teacher's own targets at V=8192 (sampled K=256, top_k 128, full),
written by `LogitStoreWriter` (record bytes from `encode_row`, and the zstd ArrayRecord shard
files); and `tests/test_logit_store.py`'s synthetic Gemma-3-like teacher (Zipf over a random
permutation of the ids, entropy ~ exponential with mean 2.5 nats) at V=262,144 for sampled
K=256 and top_k 128; full at 262,144 from the record layout: (32-byte header + t * V * 2) / t
bytes per token with bf16 log-probs, (32 + t * (V + 8)) / t with u8. The teacher here is
random-init, so its distributions are nearly uniform (entropy is printed): K=256 draws land on
~250 distinct ids and the sampled store is far larger than a trained teacher's would be.

Peak memory: `step.lower(...).compile().memory_analysis()` of the offline distill step and of
the plain CE step at vocab 65,536 (student otherwise, batch 4 x 256), from abstract shapes.

Results and the machine they came from are in `bench/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import logit_store
from recipes.distill import Config as DistillConfig
from recipes.distill import make_loss
from recipes.pretrain import lm_loss
from recipes.sample_logits import default_overlap, make_teacher_targets
from train.config import DistillLossConfig, InitConfig, OptimConfig
from train.loop import abstract_params, init_params, make_train_step, put_batch
from train.mesh import MeshConfig, batch_sharding, like_params_shardings, make_mesh
from train.models.config import ModelConfig
from train.optim import build_optimizer

BATCH, SEQ, VOCAB = 8, 256, 8192
K_SAMPLED, K_TOP = 256, 128
MEM_VOCAB, MEM_BATCH = 65_536, 4
SYNTH_VOCAB = 262_144
WARMUP = 2

TEACHER = dict(
    family="gemma3",
    vocab_size=VOCAB,
    num_layers=6,
    d_model=512,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    ffw_dim=2048,
    layer_pattern=("local",) * 5 + ("global",),
    sliding_window=128,
    rope_base=1_000_000.0,
    rope_local_base=10_000.0,
    scan_layers=False,
)
STUDENT = dict(
    family="gemma3",
    vocab_size=VOCAB,
    num_layers=4,
    d_model=256,
    num_heads=4,
    num_kv_heads=1,
    head_dim=64,
    ffw_dim=1024,
    layer_pattern=("local",),
    sliding_window=128,
    rope_local_base=10_000.0,
    scan_layers=False,
)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", clip_norm=None)
ONLINE_LOSS = DistillLossConfig(kind="full_kl", alpha=0.5, temperature=2.0)
OFFLINE_LOSS = DistillLossConfig(kind="sampled_ce")

# Issue 7: Tunix 0.1.7 on this CPU, same models and batch.
TUNIX = {
    "online_tokens_per_s": 1070.0,  # about 1.9 s per step
    "ce_tokens_per_s": 2230.0,  # student-only cross-entropy
    "matmul_peak_flops": (215e9, 233e9),
}
TARGETS = {
    "online_vs_tunix_online": 1.2,
    "offline_vs_tunix_online": 2.0,
    "mfu_offline": 0.6,
    "sampling_overhead": 0.10,
    "memory_ratio": 1.2,
}


# ---------------------------------------------------------------------------------------------
# FLOPs


def mean_keys(window: int | None, seq: int) -> float:
    """Mean number of keys per query under a causal (optionally windowed) mask."""
    w = window or seq
    return sum(min(w, p) for p in range(1, seq + 1)) / seq


def forward_flops_per_token(cfg: ModelConfig, n_params: int, seq: int) -> float:
    attn = sum(
        4
        * cfg.num_heads
        * cfg.head_dim
        * mean_keys(cfg.sliding_window if k == "local" else None, seq)
        for k in cfg.layer_kinds
    )
    return 2 * n_params + attn


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Setup shared by the measurements


class Setup:
    def __init__(self):
        self.mesh = make_mesh(MeshConfig(data=-1), devices=jax.devices()[:1])
        self.rules = MeshConfig().logical_rules()
        self.on_batch = batch_sharding(self.mesh)

    def params(self, model_cfg: ModelConfig, seed: int = 0):
        return init_params(
            model_cfg=model_cfg, init=InitConfig(), mesh=self.mesh, rules=self.rules, seed=seed
        )

    def train_step(self, model_cfg, loss_fn, *, total_steps, extra_shardings=None, seed=0):
        """(step, params, opt_state) exactly as recipes/pretrain.py and recipes/distill.py."""
        graphdef, params, shardings = self.params(model_cfg, seed)
        tx = build_optimizer(OPTIM, total_steps=total_steps)
        opt_shardings = like_params_shardings(
            jax.eval_shape(tx.init, params), params=params, shardings=shardings
        )
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        step = make_train_step(
            graphdef=graphdef,
            tx=tx,
            loss_fn=loss_fn,
            grad_accum=OPTIM.grad_accum,
            param_shardings=shardings,
            opt_shardings=opt_shardings,
            batch_sharding=self.on_batch,
            rng=jax.random.key(seed),
            extra_shardings=extra_shardings,
        )
        return step, params, opt_state

    def put(self, batch: dict) -> dict:
        return put_batch(batch, self.on_batch)


def text_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed-row batch of random tokens (one document per row: every target is real)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def distill_config(loss: DistillLossConfig, *, online: bool) -> DistillConfig:
    source = {"teacher": "teacher"} if online else {"logits": "logits"}
    return DistillConfig(kind="distill", model="student", loss=loss, **source)


# ---------------------------------------------------------------------------------------------
# Timing


def _summary(times: list[float], first: float, tokens: int) -> dict:
    med = statistics.median(times)
    return {
        "runs": len(times),
        "first_call_s": first,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": tokens / med,
    }


def train_call(step, params, opt_state, batch, extra):
    """A zero-argument call that runs one train step, carrying the (donated) state."""
    state = {"params": params, "opt_state": opt_state, "step": 0, "metrics": None}

    def once():
        state["params"], state["opt_state"], state["metrics"] = step(
            state["params"], state["opt_state"], batch, state["step"], extra
        )
        state["step"] += 1
        jax.block_until_ready((state["params"], state["opt_state"], state["metrics"]))

    def final_loss() -> float:
        m = jax.device_get(state["metrics"])
        if not np.isfinite(m["loss"]) or m["nonfinite"]:
            raise RuntimeError(f"non-finite loss in the benchmark: {m}")
        return float(m["loss"])

    return once, final_loss


def run_rounds(calls: dict, *, steps: int) -> dict[str, tuple[float, list[float]]]:
    """{name: (first call s, [steps timed s])}. Each call is compiled and warmed up, then the
    timed calls go in rounds, one of each per round (order rotated), so that every benchmark
    sees the same share of whatever else the machine is running."""
    first = {}
    for name, once in calls.items():
        t0 = time.perf_counter()
        once()
        first[name] = time.perf_counter() - t0
        for _ in range(WARMUP):
            once()
        print(f"  compiled and warmed up {name} (first call {first[name]:.1f} s)", flush=True)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        if (r + 1) % 5 == 0 or r + 1 == steps:
            print(f"  round {r + 1}/{steps}, load average {loadavg()}", flush=True)
    return {n: (first[n], times[n]) for n in names}


def matmul_peak(sizes, runs: int) -> dict:
    """Best float32 matmul GFLOP/s over `sizes` (M, K, N): fastest of `runs` per size."""
    rows = []
    for m, k, n in sizes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        f(a, b).block_until_ready()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        flops = 2 * m * k * n
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "best_gflops": flops / min(times) / 1e9,
                "median_gflops": flops / statistics.median(times) / 1e9,
            }
        )
        print(
            f"  matmul {m}x{k} @ {k}x{n}: best {rows[-1]['best_gflops']:.0f} GFLOP/s, "
            f"median {rows[-1]['median_gflops']:.0f}",
            flush=True,
        )
    return {"sizes": rows, "peak_flops": max(r["best_gflops"] for r in rows) * 1e9}


# ---------------------------------------------------------------------------------------------
# Logit store


def write_store(
    directory: str, targets: dict, *, vocab, method, k, logprob_dtype, seq, repeats=1
) -> dict:
    """Write `targets` [n, t, *] as a real store; returns its manifest (bytes per token).

    The rows are written `repeats` times (as new row indices): ArrayRecord files grow in 64 KiB
    blocks, so a store of a few rows overstates the shard bytes per token by up to
    64 KiB / tokens; each record is its own zstd chunk, so repeats do not compress together.
    """
    meta = dict(
        params_sha256="00" * 32,
        tokenizer_fingerprint="bench",
        vocab_size=vocab,
        method=method,
        k=k,
        temperature=1.0,
        logprob_dtype=logprob_dtype,
        seq_len=seq,
    )
    n = len(targets["ids"])
    with logit_store.LogitStoreWriter(
        directory, process_index=0, meta=meta, rows_per_shard=n * repeats
    ) as writer:
        for r in range(repeats):
            writer.write_batch(np.arange(r * n, (r + 1) * n), targets)
    return logit_store.write_manifest(directory, num_rows=n * repeats)


def store_row(name, manifest, *, distinct=None) -> dict:
    return {
        "targets": name,
        "vocab": manifest["vocab_size"],
        "method": manifest["method"],
        "k": manifest["k"],
        "logprob_dtype": manifest["logprob_dtype"],
        "record_bytes_per_token": manifest["record_bytes_per_token"],
        "shard_bytes_per_token": manifest["bytes_per_token"],
        "distinct_ids_per_token": distinct,
    }


def full_record_bytes_per_token(vocab: int, seq: int, logprob_dtype: str) -> float:
    header = 32  # struct "<4sBBBBQIIII", see data/logit_store.py
    per_pos = 2 * vocab if logprob_dtype == "bf16" else vocab + 8  # u8 adds a float32 (lo, hi)
    return (header + seq * per_pos) / seq


def synthetic_store_rows(tmp: str, *, seq: int, repeats: int) -> tuple[list[dict], float]:
    """tests/test_logit_store.py's Gemma-3-like teacher at 262,144 ids."""
    from tests.test_logit_store import zipf_logits

    rng = np.random.default_rng(0)
    entropies = np.clip(rng.exponential(2.5, seq), 0.01, 8)
    logits = jnp.asarray(zipf_logits(rng, vocab=SYNTH_VOCAB, entropies=entropies))[None]
    rows = []
    for method, k in (("sampled", K_SAMPLED), ("top_k", K_TOP)):
        t = logit_store.sample_targets(key=jax.random.key(0), logits=logits, method=method, k=k)
        t = jax.device_get(t)
        distinct = float(t["valid"].sum(-1).mean())
        for dtype in ("bf16", "u8"):
            d = os.path.join(tmp, f"synth-{method}-{dtype}")
            man = write_store(
                d, t, vocab=SYNTH_VOCAB, method=method, k=k, logprob_dtype=dtype, seq=seq,
                repeats=repeats,
            )  # fmt: skip
            rows.append(store_row("synthetic Gemma-3-like", man, distinct=distinct))
    for dtype in ("bf16", "u8"):
        b = full_record_bytes_per_token(SYNTH_VOCAB, SEQ, dtype)
        rows.append(
            {
                "targets": "arithmetic",
                "vocab": SYNTH_VOCAB,
                "method": "full",
                "k": SYNTH_VOCAB,
                "logprob_dtype": dtype,
                "record_bytes_per_token": b,
                "shard_bytes_per_token": None,
                "distinct_ids_per_token": SYNTH_VOCAB,
            }
        )
    return rows, float(entropies.mean())


# ---------------------------------------------------------------------------------------------
# Peak memory


def memory_stats(setup: Setup, *, steps: int) -> dict:
    """Compiled memory of the offline distill step vs the CE step at a large vocabulary."""
    student = ModelConfig(**{**STUDENT, "vocab_size": MEM_VOCAB})
    spec = tuple(setup.on_batch.spec)

    def abstract(shape, dtype):
        sh = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(*spec[: len(shape)]))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    b, t = MEM_BATCH, SEQ
    text = {
        "inputs": abstract((b, t), jnp.int32),
        "targets": abstract((b, t), jnp.int32),
        "positions": abstract((b, t), jnp.int32),
        "segment_ids": abstract((b, t), jnp.int32),
        "loss_mask": abstract((b, t), jnp.float32),
    }
    offline = {
        **text,
        "ids": abstract((b, t, K_SAMPLED), jnp.int32),
        "valid": abstract((b, t, K_SAMPLED), jnp.bool_),
        "teacher_logprobs": abstract((b, t, K_SAMPLED), jnp.float32),
        "counts": abstract((b, t, K_SAMPLED), jnp.int32),
    }
    graphdef, params, shardings = abstract_params(student, mesh=setup.mesh, rules=setup.rules)
    tx = build_optimizer(OPTIM, total_steps=steps)
    opt_shardings = like_params_shardings(
        jax.eval_shape(tx.init, params), params=params, shardings=shardings
    )
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_state, opt_shardings
    )
    out = {"vocab": MEM_VOCAB, "batch": b, "seq": t, "k": K_SAMPLED}
    for name, loss_fn, batch in (
        ("ce", lm_loss, text),
        ("offline", make_loss(distill_config(OFFLINE_LOSS, online=False), teacher_graphdef=None),
         offline),
    ):  # fmt: skip
        step = make_train_step(
            graphdef=graphdef,
            tx=tx,
            loss_fn=loss_fn,
            grad_accum=1,
            param_shardings=shardings,
            opt_shardings=opt_shardings,
            batch_sharding=setup.on_batch,
            rng=jax.random.key(0),
        )
        mem = step.lower(params, opt_state, batch, 0, None).compile().memory_analysis()
        if mem is None:
            raise RuntimeError("compiled.memory_analysis() returned None on this backend")
        out[name] = {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
        }
        o = out[name]
        o["peak_bytes"] = (
            o["temp_bytes"] + o["argument_bytes"] + o["output_bytes"] - o["alias_bytes"]
        )
    out["logits_bytes"] = b * t * MEM_VOCAB * 4
    out["temp_ratio"] = out["offline"]["temp_bytes"] / out["ce"]["temp_bytes"]
    out["peak_ratio"] = out["offline"]["peak_bytes"] / out["ce"]["peak_bytes"]
    return out


# ---------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="few steps (a CI smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    t_start = time.perf_counter()
    tokens = BATCH * SEQ
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "config": {
            "batch": BATCH,
            "seq": SEQ,
            "vocab": VOCAB,
            "steps": steps,
            "warmup": WARMUP,
            "teacher": TEACHER,
            "student": STUDENT,
            "optim": OPTIM.model_dump(),
            "online_loss": ONLINE_LOSS.model_dump(),
            "offline_loss": OFFLINE_LOSS.model_dump(),
        },
        "loadavg_start": loadavg(),
    }
    print(f"load average at start: {out['loadavg_start']}", flush=True)
    setup = Setup()
    teacher_cfg, student_cfg = ModelConfig(**TEACHER), ModelConfig(**STUDENT)
    t_graphdef, t_params, t_shardings = setup.params(teacher_cfg, seed=1)
    n_teacher = count_params(t_params)
    n_student = count_params(setup.params(student_cfg)[1])
    fwd_t = forward_flops_per_token(teacher_cfg, n_teacher, SEQ)
    fwd_s = forward_flops_per_token(student_cfg, n_student, SEQ)
    out["params"] = {"teacher": n_teacher, "student": n_student}
    out["flops_per_token"] = {
        "teacher_forward": fwd_t,
        "student_forward": fwd_s,
        "student_train": 3 * fwd_s,
        "online": 3 * fwd_s + fwd_t,
    }
    print(
        f"teacher {n_teacher / 1e6:.2f}M params ({fwd_t / 1e6:.1f} MFLOP/token forward), "
        f"student {n_student / 1e6:.2f}M ({fwd_s / 1e6:.1f} MFLOP/token forward)",
        flush=True,
    )

    # ---- matmul peak
    print("matmul peak (float32, jitted)", flush=True)
    sizes = [(1024, 1024, 1024), (2048, 2048, 2048)]
    if not args.quick:
        sizes += [(3072, 3072, 3072), (BATCH * SEQ, 256, VOCAB)]
    out["matmul"] = matmul_peak(sizes, runs=3 if args.quick else 8)
    peak = out["matmul"]["peak_flops"]

    text = text_batch(BATCH, SEQ, VOCAB)
    text_dev = setup.put(text)
    sample_dev = setup.put({**text, "row_ids": np.arange(BATCH, dtype=np.int32)})
    kw = lambda b: dict(positions=b["positions"], segment_ids=b["segment_ids"])
    teacher_forward = jax.jit(lambda p, b: nnx.merge(t_graphdef, p)(b["inputs"], **kw(b)))
    target_fns = {
        method: make_teacher_targets(
            t_graphdef, method=method, k=k, temperature=1.0, key=jax.random.key(2)
        )
        for method, k in (("sampled", K_SAMPLED), ("top_k", K_TOP), ("full", VOCAB))
    }

    # ---- store bytes on the teacher's own targets; the offline batch is read from the store
    print("logit store on the teacher's targets", flush=True)
    tmp = tempfile.mkdtemp(prefix="distill-bench-")
    store_rows = []
    targets = {m: jax.device_get(f(t_params, sample_dev)) for m, f in target_fns.items()}
    full_lp = targets["full"]["teacher_logprobs"]
    teacher_entropy = float(-(np.exp(full_lp) * full_lp).sum(-1).mean())
    del full_lp
    for method, k in (("sampled", K_SAMPLED), ("top_k", K_TOP), ("full", VOCAB)):
        distinct = float(targets[method]["valid"].sum(-1).mean())
        for dtype in ("bf16", "u8"):
            man = write_store(
                os.path.join(tmp, f"{method}-{dtype}"),
                targets[method],
                vocab=VOCAB,
                method=method,
                k=k,
                logprob_dtype=dtype,
                seq=SEQ,
                repeats=1 if method == "full" or args.quick else 16,
            )
            store_rows.append(store_row("teacher (random init)", man, distinct=distinct))
    del targets
    reader = logit_store.LogitStoreReader(os.path.join(tmp, "sampled-bf16"))
    rows = np.arange(BATCH)
    read_times, put_times = [], []
    for _ in range(max(3, steps // 2)):
        t0 = time.perf_counter()
        stored = reader.read_rows(rows)
        t1 = time.perf_counter()
        offline_dev = jax.block_until_ready(setup.put({**text, **stored}))
        put_times.append(time.perf_counter() - t1)
        read_times.append(t1 - t0)
    out["store_read"] = {
        "read_rows_median_s": statistics.median(read_times),
        "put_batch_median_s": statistics.median(put_times),
        "read_tokens_per_s": tokens / statistics.median(read_times),
    }
    print(
        f"  read_rows of {BATCH} rows {out['store_read']['read_rows_median_s'] * 1e3:.1f} ms, "
        f"put_batch {out['store_read']['put_batch_median_s'] * 1e3:.1f} ms",
        flush=True,
    )

    # ---- every timed call, run in interleaved rounds
    parts: list[tuple[float, float, float]] = []
    in_flight: list = []

    def encode(host) -> None:
        for i in range(BATCH):
            logit_store.encode_row(
                {n: x[i] for n, x in host.items()},
                row_index=i,
                vocab_size=VOCAB,
                method="sampled",
                k=K_SAMPLED,
                logprob_dtype="bf16",
            )

    overlap = default_overlap()  # as the sample_logits stage decides

    def sample_logits_once() -> None:
        """The sample_logits stage's loop, one batch. On an accelerator: dispatch this batch's
        forward + sampling, fetch and encode the previous batch while the device works, then
        wait for this batch. On a CPU: forward + sampling, then fetch and encode this batch.
        Parts: fetch, encode, and the wait for the device outside them."""
        t0 = time.perf_counter()
        on_device = target_fns["sampled"](t_params, sample_dev)
        if not overlap:
            in_flight.append(jax.block_until_ready(on_device))
        t1 = time.perf_counter()
        host = jax.device_get(in_flight.pop()) if in_flight else None
        t2 = time.perf_counter()
        if host is not None:
            encode(host)
        t3 = time.perf_counter()
        if overlap:
            in_flight.append(jax.block_until_ready(on_device))
        parts.append((t2 - t1, t3 - t2, (t1 - t0) + (time.perf_counter() - t3)))

    def sample_device_once() -> None:
        """The forward + sampling program alone (what the stage's loop overlaps with)."""
        jax.block_until_ready(target_fns["sampled"](t_params, sample_dev))

    mm = jax.jit(jnp.matmul)
    mm_a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    total_steps = 1 + WARMUP + steps
    offline_loss = make_loss(
        distill_config(OFFLINE_LOSS, online=False), teacher_graphdef=t_graphdef
    )
    online_loss = make_loss(distill_config(ONLINE_LOSS, online=True), teacher_graphdef=t_graphdef)
    scan_cfg = ModelConfig(**{**STUDENT, "scan_layers": True})
    losses = {}
    calls = {
        "matmul 2048^3": lambda: mm(mm_a, mm_a).block_until_ready(),
        "teacher forward": lambda: teacher_forward(t_params, text_dev).block_until_ready(),
        "sample_logits": sample_logits_once,
        "sample_logits, device": sample_device_once,
    }
    for name, cfg, loss_fn, batch, extra in (
        ("student CE", student_cfg, lm_loss, text_dev, None),
        ("offline distill", student_cfg, offline_loss, offline_dev, None),
        ("online distill", student_cfg, online_loss, text_dev, t_params),
        ("student CE, scan_layers", scan_cfg, lm_loss, text_dev, None),
    ):
        step, p, o = setup.train_step(
            cfg,
            loss_fn,
            total_steps=total_steps,
            extra_shardings=t_shardings if extra is not None else None,
        )
        calls[name], losses[name] = train_call(step, p, o, batch, extra)
        del step, p, o
    print(f"timed calls, batch {BATCH} x seq {SEQ}, {steps} interleaved rounds", flush=True)
    measured = run_rounds(calls, steps=steps)
    del parts[:-steps]  # keep the timed rounds' parts only
    timings = {}
    for name, (first, times) in measured.items():
        timings[name] = _summary(times, first, tokens)
        if name in losses:
            timings[name]["final_loss"] = losses[name]()
    mm_times = measured["matmul 2048^3"][1]
    mm_flops = 2 * 2048**3
    out["matmul"]["interleaved"] = {
        "best_gflops": mm_flops / min(mm_times) / 1e9,
        "median_gflops": mm_flops / statistics.median(mm_times) / 1e9,
    }
    peak = max(peak, mm_flops / min(mm_times))
    out["matmul"]["peak_flops"] = peak
    del timings["matmul 2048^3"]
    r = timings["sample_logits"]
    r["device_get_median_s"] = statistics.median(x[0] for x in parts)
    r["encode_median_s"] = statistics.median(x[1] for x in parts)
    r["wait_median_s"] = statistics.median(x[2] for x in parts)
    for name, r in timings.items():
        print(
            f"  {name:24s} median {r['median_s'] * 1e3:7.1f} ms (min {r['min_s'] * 1e3:7.1f}, "
            f"max {r['max_s'] * 1e3:7.1f}) -> {r['tokens_per_s']:6,.0f} tokens/s; first call "
            f"{r['first_call_s']:4.1f} s",
            flush=True,
        )
    r = timings["sample_logits"]
    print(
        f"    sample_logits (stage loop{', host work overlapped' if overlap else ''}): device "
        f"wait {r['wait_median_s'] * 1e3:.1f} ms, device_get {r['device_get_median_s'] * 1e3:.1f}"
        f" ms, encode_row x{BATCH} {r['encode_median_s'] * 1e3:.1f} ms; the forward + sampling "
        f"alone {timings['sample_logits, device']['median_s'] * 1e3:.1f} ms",
        flush=True,
    )
    print(
        f"  interleaved matmul 2048^3: best {out['matmul']['interleaved']['best_gflops']:.0f}, "
        f"median {out['matmul']['interleaved']['median_gflops']:.0f} GFLOP/s",
        flush=True,
    )
    out["timings"] = timings

    # ---- store size at 262k, synthetic
    print(f"store bytes per token (synthetic teacher at V={SYNTH_VOCAB:,})", flush=True)
    synth_rows, synth_entropy = synthetic_store_rows(
        tmp, seq=64 if args.quick else 128, repeats=8 if args.quick else 64
    )
    store_rows += synth_rows
    out["store"] = {
        "rows": store_rows,
        "teacher_entropy_nats": teacher_entropy,
        "synthetic_entropy_nats": synth_entropy,
    }

    # ---- memory
    print(f"compiled memory at vocab {MEM_VOCAB:,}, batch {MEM_BATCH} x seq {SEQ}", flush=True)
    out["memory"] = memory_stats(setup, steps=total_steps)
    shutil.rmtree(tmp, ignore_errors=True)

    # ---- summary
    fpt = out["flops_per_token"]
    tps = {k: v["tokens_per_s"] for k, v in timings.items()}
    online, offline, ce = tps["online distill"], tps["offline distill"], tps["student CE"]
    fwd = timings["teacher forward"]["median_s"]
    sl = timings["sample_logits"]["median_s"]
    summary = {
        "online_tokens_per_s": online,
        "offline_tokens_per_s": offline,
        "ce_tokens_per_s": ce,
        "ce_scan_tokens_per_s": tps["student CE, scan_layers"],
        "teacher_forward_tokens_per_s": tps["teacher forward"],
        "sample_logits_tokens_per_s": tps["sample_logits"],
        "sampling_overhead": sl / fwd - 1.0,
        "sampling_overhead_device": timings["sample_logits, device"]["median_s"] / fwd - 1.0,
        "matmul_peak_flops": peak,
        "mfu_online": online * fpt["online"] / peak,
        "mfu_offline": offline * fpt["student_train"] / peak,
        "mfu_ce": ce * fpt["student_train"] / peak,
        "mfu_teacher_forward": tps["teacher forward"] * fpt["teacher_forward"] / peak,
        "memory_temp_ratio": out["memory"]["temp_ratio"],
        "memory_peak_ratio": out["memory"]["peak_ratio"],
        "online_vs_tunix_online": online / TUNIX["online_tokens_per_s"],
        "offline_vs_tunix_online": offline / TUNIX["online_tokens_per_s"],
        "ce_vs_tunix_ce": ce / TUNIX["ce_tokens_per_s"],
    }
    # The same ratios with each side's throughput divided by its own matmul peak (Tunix's at
    # the middle of its range): a correction for a busier machine, not a measurement.
    scale = statistics.mean(TUNIX["matmul_peak_flops"]) / peak
    for key in ("online_vs_tunix_online", "offline_vs_tunix_online", "ce_vs_tunix_ce"):
        summary[key + "_at_equal_peak"] = summary[key] * scale
    out["summary"] = summary
    out["tunix"] = TUNIX
    out["targets"] = TARGETS
    out["loadavg_end"] = loadavg()
    out["total_runtime_s"] = time.perf_counter() - t_start
    print_summary(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def print_summary(out: dict) -> None:
    s, mem = out["summary"], out["memory"]
    tunix_peak = "{:.0f}-{:.0f} GFLOP/s".format(*(x / 1e9 for x in TUNIX["matmul_peak_flops"]))
    met = lambda ok: "yes" if ok else "NO"
    print(f"\nsummary (load average {out['loadavg_start']} at start, {out['loadavg_end']} at end)")
    eq = lambda key: f"{s[key + '_at_equal_peak']:.2f}x"
    rows = [
        ("online distill tokens/s", f"{s['online_tokens_per_s']:,.0f}", "1,070",
         f"{s['online_vs_tunix_online']:.2f}x", eq("online_vs_tunix_online"), ">= 1.2x",
         met(s["online_vs_tunix_online"] >= TARGETS["online_vs_tunix_online"])),
        ("offline distill tokens/s", f"{s['offline_tokens_per_s']:,.0f}", "1,070 (online)",
         f"{s['offline_vs_tunix_online']:.2f}x", eq("offline_vs_tunix_online"), ">= 2x",
         met(s["offline_vs_tunix_online"] >= TARGETS["offline_vs_tunix_online"])),
        ("student CE tokens/s", f"{s['ce_tokens_per_s']:,.0f}", "2,230",
         f"{s['ce_vs_tunix_ce']:.2f}x", eq("ce_vs_tunix_ce"), "", ""),
        ("student CE tokens/s, scan", f"{s['ce_scan_tokens_per_s']:,.0f}", "", "", "", "", ""),
        ("teacher forward tokens/s", f"{s['teacher_forward_tokens_per_s']:,.0f}", "", "", "", "",
         ""),
        ("sample_logits tokens/s", f"{s['sample_logits_tokens_per_s']:,.0f}", "", "", "", "", ""),
        ("sampling overhead", f"{s['sampling_overhead']:+.1%}", "", "", "", "<= 10%",
         met(s["sampling_overhead"] <= TARGETS["sampling_overhead"])),
        ("  of which forward + sampling", f"{s['sampling_overhead_device']:+.1%}", "", "", "", "",
         ""),
        ("matmul peak", f"{s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", tunix_peak, "", "", "", ""),
        ("MFU online", f"{s['mfu_online']:.1%}", "", "", "", "", ""),
        ("MFU offline", f"{s['mfu_offline']:.1%}", "", "", "", ">= 60%",
         met(s["mfu_offline"] >= TARGETS["mfu_offline"])),
        ("MFU CE", f"{s['mfu_ce']:.1%}", "", "", "", "", ""),
        ("MFU teacher forward", f"{s['mfu_teacher_forward']:.1%}", "", "", "", "", ""),
        ("temp memory offline / CE", f"{mem['temp_ratio']:.2f}x", "", "", "", "<= 1.2x",
         met(mem["temp_ratio"] <= TARGETS["memory_ratio"])),
    ]  # fmt: skip
    head = ("quantity", "distillax", "Tunix 0.1.7", "ratio", "at equal peak", "target", "met")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  " + "  ".join(cells))
    print(
        f"\n  compiled memory at vocab {mem['vocab']:,}, batch {mem['batch']} x {mem['seq']} "
        f"(logits {mem['logits_bytes'] / 2**20:.0f} MiB):"
    )
    for name in ("ce", "offline"):
        m = mem[name]
        print(
            f"    {name:8s} temp {m['temp_bytes'] / 2**20:7.1f} MiB, arguments "
            f"{m['argument_bytes'] / 2**20:6.1f} MiB, outputs {m['output_bytes'] / 2**20:6.1f} "
            f"MiB, peak (temp + args + outputs - aliased) {m['peak_bytes'] / 2**20:7.1f} MiB"
        )
    print(f"    ratio offline / CE: temp {mem['temp_ratio']:.2f}x, peak {mem['peak_ratio']:.2f}x")
    st = out["store"]
    print(
        f"\n  stored bytes per token (teacher entropy {st['teacher_entropy_nats']:.2f} nats; "
        f"synthetic {st['synthetic_entropy_nats']:.2f} nats)"
    )
    print(
        f"    {'targets':24s} {'V':>7s} {'method':>7s} {'k':>6s} {'lp':>4s} {'ids/tok':>8s} "
        f"{'record B/tok':>12s} {'shard B/tok':>11s}"
    )
    for r in st["rows"]:
        shard = "" if r["shard_bytes_per_token"] is None else f"{r['shard_bytes_per_token']:,.0f}"
        print(
            f"    {r['targets']:24s} {r['vocab']:7d} {r['method']:>7s} {r['k']:6d} "
            f"{r['logprob_dtype']:>4s} {r['distinct_ids_per_token']:8.1f} "
            f"{r['record_bytes_per_token']:12,.0f} {shard:>11s}"
        )
    print(f"\ntotal {out['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    from train.allocator import use_fast_allocator

    use_fast_allocator()  # as launch.py does: mimalloc on a CPU-only host
    main()
