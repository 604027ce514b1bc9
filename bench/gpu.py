"""Distillation throughput and MFU on one GPU at Gemma 3 shapes (1B student, 4B teacher).

    bash bench/gpu.sh                                     # on the GPU machine, OUT=<folder>
    PYTHONPATH=. python3 bench/gpu.py [--json PATH] [--steps N] [--only a,b] [--tiny]

A prepared, one-shot script for a GPU lent for a few minutes: every measurement goes through the
functions the stages use and the helpers of `bench/distill.py` (its CPU twin at toy shapes):
`Setup.train_step` (= `train.loop.make_train_step` as recipes/pretrain.py and recipes/distill.py
build it), `train_call`, `run_rounds`, `forward_flops_per_token`, `count_params`,
`distill_config`, `text_batch`, and its `OPTIM`, `ONLINE_LOSS`, `OFFLINE_LOSS`.

Measurements, in this order (cheapest and most important first; `--only` picks a subset):
  matmul           bf16 [M, K] x [K, N] through jax.jit (jnp.matmul on bf16 arrays): best of
                   4096^3 and 8192^3 = the measured peak; the student's LM-head shape
                   [tokens, 1152] x [1152, 262144] is reported beside it, not in the peak.
  ce               student train step, `recipes.pretrain.lm_loss` (plain next-token CE).
  offline          student train step, `recipes.distill.make_loss` with loss sampled_ce
                   (alpha 1, T 1); the batch carries ids / valid / teacher_logprobs / counts
                   [b, t, 256] made by `make_teacher_targets` (the sample_logits program) from
                   the random-init teacher (falls back to `logit_store.sample_targets` on random
                   logits if the teacher cannot be built), fetched to the host and put back with
                   `put_batch`, as the distill stage does with rows read from the store.
  teacher_forward  the teacher's forward (float32 logits [b, t, V]), jitted as in distill.py.
  sample_logits    `recipes.sample_logits.make_teacher_targets`, method sampled, K=256: forward
                   + sampling on the device (the stage's device work); the fetch of the targets
                   to the host is timed apart. Overhead = its time / teacher_forward's - 1.
  online           student train step with the teacher inside (make_loss, full_kl, forward KL,
                   T 2, alpha 0.5 = bench/distill.py's ONLINE_LOSS).

Models: `get_preset("gemma3-1b")` (~1.00B parameters, ~0.30B of them the tied embedding) and
`get_preset("gemma3-4b", vocab_size=<student's>)` (~3.88B; both presets already have 262,144
ids), `scan_layers=True` (one compiled 6-layer unit per model: compile time).
Numerics: the student trains in the usual mixed precision, float32 parameters and AdamW state,
bfloat16 compute (`compute_dtype`; logits and the losses' softmaxes are float32), with
`remat="save_matmuls"` (matmul outputs saved, attention recomputed in the backward pass) so that
the step fits an 80 GB card; the teacher is frozen, so it is held and run in bfloat16
(param_dtype = compute_dtype = bfloat16, what the distill stage's `teacher_dtype: bfloat16`
gives). Optimizer: bench/distill.py's OPTIM (AdamW, lr 1e-3 constant, no clipping).

Batch: 4 x 2048 = 8192 tokens for ce, offline, teacher_forward and sample_logits; the online
step takes 2 x 2048 on a card of < 110 GB (an H100) and 4 x 2048 on a bigger one (an H200), see
`--online-batch`. Random tokens, one document per row. Memory estimate, H100 (80 GB, 0.92 of it
given to XLA = ~73 GiB), 8192 tokens: student fp32 params + grads + Adam mu/nu 16 GB (+ the
update's temporaries); float32 logits [8192, 262144] are 8.6 GB each: the CE / sampled_ce step
holds the logits and their gradient (~17-26 GB); saved activations with save_matmuls ~8 GB
(26 layers x 8192 tokens x ~18k bf16 values) -> ~45-55 GB. Online at 8192 tokens would add the
bf16 teacher (7.8 GB) and its float32 logits (8.6 GB), plus full_kl's full-vocabulary temporaries:
~75-90 GB, too much for an H100; at 4096 tokens ~50-60 GB. sample_logits at 8192 tokens: teacher
7.8 GB + logits, log-softmax, probabilities and within-block CDF, 8.6 GB each: ~45 GB.
Every program's compiled memory (`memory_analysis()`) is recorded, and the device's
`peak_bytes_in_use` after each measurement (a high-water mark over the whole process, so it only
grows; the per-program figure is the one to read).

FLOPs (bench/distill.py's convention, "useful" FLOPs as in PaLM's MFU): forward per token =
2 N + sum over layers of 4 * heads * head_dim * mean keys under the (windowed) causal mask;
train = 3 x forward; online = 3 x forward(student) + forward(teacher); MFU = model FLOP/s /
measured matmul peak (and / the card's spec dense bf16 peak, 989 TFLOP/s for H100 SXM and H200).
Remat's recomputation, the optimizer, softmaxes and the sampler are not counted.

Timing: each program is lowered and compiled ahead of time (`.lower().compile()`: compile time
and memory_analysis), then `run_rounds` makes 1 + 2 warm-up calls and `--steps` timed calls,
each ending in `block_until_ready`; medians are reported. The JSON file is rewritten after every
measurement, so a run killed at its time limit keeps what it measured; a measurement that fails
(out of memory, say) is recorded with its error and the rest still run.

`--tiny` shrinks everything (7 and 8 layers: one scanned 6-layer unit plus a tail; d_model 128,
vocab 4096, batch 2 x seq 128) to check the script on a CPU: about a minute on 2 busy cores.

Versions: written against jax 0.10.2 / flax 0.12.8 (this repo's venv); the GPU image has jax
0.11.2, under which flax 0.12.8 fails to import, so bench/gpu.sh carries flax 0.12.12 (this
script's --tiny run passed with jax 0.11.2 + flax 0.12.12 on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # run as a script: bench/ is sys.path[0]
    import distill as bd
except ImportError:  # python -m bench.gpu from the repo root
    from bench import distill as bd
from data import logit_store
from recipes.distill import make_loss
from recipes.pretrain import lm_loss
from recipes.sample_logits import make_teacher_targets
from train.loop import abstract_params
from train.models.presets import get_preset

K_SAMPLED = 256
NAMES = ("matmul", "ce", "offline", "teacher_forward", "sample_logits", "online")
# Dense bf16 tensor-core peak from the data sheets (no sparsity), by device_kind substring.
SPEC_PEAK = (("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100", 989.4e12), ("A100", 312e12))

STUDENT_PRESET, TEACHER_PRESET = "gemma3-1b", "gemma3-4b"
NUMERICS_STUDENT = dict(param_dtype="float32", compute_dtype="bfloat16", scan_layers=True)
NUMERICS_TEACHER = dict(param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True)
FULL = dict(batch=4, seq=2048, remat="save_matmuls")
# CPU check: Gemma 3 layouts (5 local : 1 global), one scanned unit + a tail each.
TINY = dict(batch=2, seq=128, remat="save_matmuls")
TINY_COMMON = dict(vocab_size=4096, d_model=128, sliding_window=64, query_pre_attn_scalar=32)
TINY_STUDENT = dict(
    TINY_COMMON, num_layers=7, num_heads=4, num_kv_heads=1, head_dim=32, ffw_dim=256
)
TINY_TEACHER = dict(
    TINY_COMMON, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=32, ffw_dim=512
)


# ---------------------------------------------------------------------------------------------
# helpers


def device_memory() -> dict | None:
    """The device allocator's counters (None on backends without them, e.g. CPU)."""
    try:
        s = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not s:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(s[k]) for k in keys if k in s}


def program_memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    d = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    d["peak_bytes"] = d["temp_bytes"] + d["argument_bytes"] + d["output_bytes"] - d["alias_bytes"]
    return d


def compile_timed(name: str, fn, *args):
    """(compiled, info): ahead-of-time lower + compile, timed, with the compiled memory."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info = {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": program_memory(compiled)}
    mem = info["memory"]
    peak = f", program peak {mem['peak_bytes'] / 2**30:.2f} GiB" if mem else ""
    print(
        f"  compiled {name}: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s{peak}", flush=True
    )
    return compiled, info


def is_oom(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def spec_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    for key, flops in SPEC_PEAK:
        if key in kind:
            return flops
    return None


def bf16_matmul(sizes, *, reps: int, inner: int) -> list[dict]:
    """GFLOP/s of jitted bf16 [M, K] x [K, N]: `reps` timings of `inner` back-to-back calls."""
    rows = []
    f = jax.jit(jnp.matmul)
    for m, k, n in sizes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        first = time.perf_counter() - t0
        for _ in range(2):
            f(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                y = f(a, b)
            y.block_until_ready()
            times.append((time.perf_counter() - t0) / inner)
        del y
        flops = 2 * m * k * n
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "first_call_s": first,
                "best_s": min(times),
                "best_flops": flops / min(times),
                "median_flops": flops / statistics.median(times),
            }
        )
        print(
            f"  matmul bf16 {m}x{k} @ {k}x{n}: best {rows[-1]['best_flops'] / 1e12:.1f} TFLOP/s, "
            f"median {rows[-1]['median_flops'] / 1e12:.1f} (first call {first:.1f} s)",
            flush=True,
        )
        del a, b
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (rewritten after each one)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per program")
    parser.add_argument("--only", help=f"comma list of: {','.join(NAMES)}")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, to check on a CPU")
    parser.add_argument("--batch", type=int, help="rows per batch (default 4; tiny 2)")
    parser.add_argument("--seq", type=int, help="sequence length (default 2048; tiny 128)")
    parser.add_argument(
        "--online-batch",
        type=int,
        help="rows for the online step (default: --batch on a card of >= 110 GB, else half)",
    )
    parser.add_argument(
        "--remat", choices=("none", "full", "save_matmuls"), help="student remat policy"
    )
    args = parser.parse_args()
    only = NAMES if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        parser.error(f"--only: unknown {unknown}; valid: {', '.join(NAMES)}")
    shape = TINY if args.tiny else FULL
    batch, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    remat = args.remat or shape["remat"]
    steps = args.steps
    t_start = time.perf_counter()

    mem0 = device_memory()
    limit = (mem0 or {}).get("bytes_limit")
    if args.online_batch:
        online_batch = args.online_batch
    elif args.tiny or limit is None or limit >= 110e9:
        online_batch = batch
    else:
        online_batch = max(1, batch // 2)

    student_cfg = get_preset(
        STUDENT_PRESET, **NUMERICS_STUDENT, remat=remat, **(TINY_STUDENT if args.tiny else {})
    )
    teacher_cfg = get_preset(
        TEACHER_PRESET,
        **NUMERICS_TEACHER,
        **{**(TINY_TEACHER if args.tiny else {}), "vocab_size": student_cfg.vocab_size},
    )
    vocab = student_cfg.vocab_size
    setup = bd.Setup()
    n_student = bd.count_params(abstract_params(student_cfg, mesh=setup.mesh, rules=setup.rules)[1])
    n_teacher = bd.count_params(abstract_params(teacher_cfg, mesh=setup.mesh, rules=setup.rules)[1])
    fwd_s = bd.forward_flops_per_token(student_cfg, n_student, seq)
    fwd_t = bd.forward_flops_per_token(teacher_cfg, n_teacher, seq)
    fpt = {
        "student_forward": fwd_s,
        "teacher_forward": fwd_t,
        "student_train": 3 * fwd_s,
        "online": 3 * fwd_s + fwd_t,
    }
    dev = jax.devices()[0]
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "flax": _version("flax"),
            "optax": _version("optax"),
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "device_count": jax.device_count(),
            "memory_at_start": mem0,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        },
        "config": {
            "tiny": args.tiny,
            "batch": batch,
            "seq": seq,
            "online_batch": online_batch,
            "steps": steps,
            "warmup": bd.WARMUP,
            "k_sampled": K_SAMPLED,
            "student": student_cfg.model_dump(),
            "teacher": teacher_cfg.model_dump(),
            "optim": bd.OPTIM.model_dump(),
            "online_loss": bd.ONLINE_LOSS.model_dump(),
            "offline_loss": bd.OFFLINE_LOSS.model_dump(),
        },
        "params": {"student": n_student, "teacher": n_teacher},
        "flops_per_token": fpt,
        "peak": {"measured_flops": None, "spec_flops": spec_peak()},
        "results": {},
    }
    print(
        f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax "
        f"{out['machine']['flax']}; memory {mem0}\n"
        f"student {STUDENT_PRESET} {n_student / 1e9:.3f}B params ({fwd_s / 1e9:.2f} GFLOP/token "
        f"forward), teacher {TEACHER_PRESET} {n_teacher / 1e9:.3f}B ({fwd_t / 1e9:.2f}); "
        f"batch {batch} x {seq}, online {online_batch} x {seq}, remat {remat}, {steps} steps",
        flush=True,
    )

    def save() -> None:
        out["total_runtime_s"] = time.perf_counter() - t_start
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2, default=str)
            os.replace(tmp, args.json)

    save()

    def mfu_fields(r: dict, flops_per_token: float) -> None:
        r["flops_per_token"] = flops_per_token
        r["model_flops_per_s"] = r["tokens_per_s"] * flops_per_token
        peak, spec = out["peak"]["measured_flops"], out["peak"]["spec_flops"]
        r["mfu"] = r["model_flops_per_s"] / peak if peak else None
        r["mfu_spec"] = r["model_flops_per_s"] / spec if spec else None

    def timed(name: str, once, tokens: int, flops_per_token: float, info: dict) -> dict:
        measured = bd.run_rounds({name: once}, steps=steps)
        first, times = measured[name]
        r = {**bd._summary(times, first, tokens), **info, "tokens": tokens}
        mfu_fields(r, flops_per_token)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"  {name}: median {r['median_s'] * 1e3:.1f} ms (min {r['min_s'] * 1e3:.1f}) -> "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['model_flops_per_s'] / 1e12:.1f} TFLOP/s, "
            f"MFU {mfu}",
            flush=True,
        )
        return r

    def measure(name: str, fn) -> None:
        if name not in only:
            return
        print(f"\n== {name} (at {time.perf_counter() - t_start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            r = fn()
            r["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - record it, run the rest
            traceback.print_exc()
            r = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:3000]}"}
        r["wall_s"] = time.perf_counter() - t0
        gc.collect()
        r["device_memory_after"] = device_memory()
        out["results"][name] = r
        save()

    # ---- shared inputs (host arrays are tiny; device copies are made per measurement)
    text = bd.text_batch(batch, seq, vocab)
    total_steps = 1 + bd.WARMUP + steps
    cache: dict = {}  # the teacher and the targets program, built once, on first use

    def teacher():
        if "params" not in cache:
            t0 = time.perf_counter()
            graphdef, params, shardings = setup.params(teacher_cfg, seed=1)
            jax.block_until_ready(params)
            cache.update(graphdef=graphdef, params=params, shardings=shardings)
            cache["init_s"] = time.perf_counter() - t0
            print(f"  teacher initialised in {cache['init_s']:.1f} s", flush=True)
        return cache["graphdef"], cache["params"], cache["shardings"]

    def targets_program(rows: int):
        """make_teacher_targets, compiled for `rows` rows (the sample_logits program)."""
        key = ("targets", rows)
        if key not in cache:
            graphdef, params, _ = teacher()
            fn = make_teacher_targets(
                graphdef, method="sampled", k=K_SAMPLED, temperature=1.0, key=jax.random.key(2)
            )
            host = {**bd.text_batch(rows, seq, vocab), "row_ids": np.arange(rows, dtype=np.int32)}
            sample = setup.put(host)
            cache[key] = compile_timed("sample_logits", fn, params, sample)
        return cache[key]

    def train_measure(name, loss_fn, batch_host: dict, fpt_key: str, extra=None, extra_sh=None):
        """One train step timed; out of memory, once more at half the rows (a new compile)."""
        rows = len(batch_host["inputs"])
        oom = []
        while True:
            try:
                part = {k: v[:rows] for k, v in batch_host.items()}
                r = train_attempt(name, loss_fn, part, fpt_key, extra, extra_sh)
                break
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                if oom or rows == 1 or not is_oom(msg):
                    raise
                oom.append({"batch": rows, "error": msg[:1500]})
            gc.collect()
            rows //= 2
            print(f"  out of memory: once more at batch {rows} x {seq}", flush=True)
        if oom:
            r["oom_retry"] = oom
        return r

    def train_attempt(name, loss_fn, batch_host: dict, fpt_key: str, extra, extra_sh):
        step, params, opt_state = setup.train_step(
            student_cfg, loss_fn, total_steps=total_steps, extra_shardings=extra_sh
        )
        dev_batch = setup.put(batch_host)
        compiled, info = compile_timed(name, step, params, opt_state, dev_batch, 0, extra)
        del step
        once, final_loss = bd.train_call(compiled, params, opt_state, dev_batch, extra)
        del params, opt_state
        rows = len(batch_host["inputs"])
        r = timed(name, once, rows * seq, fpt[fpt_key], info)
        r["batch"], r["seq"] = rows, seq
        try:
            r["final_loss"] = final_loss()
        except Exception as e:  # noqa: BLE001 - keep the timings
            r["final_loss_error"] = str(e)[:500]
        return r

    # ---- 1. matmul peak
    def m_matmul():
        if args.tiny:
            square, head, reps, inner = [(256,) * 3, (512,) * 3], (batch * seq, 128, vocab), 3, 3
        else:
            square = [(4096,) * 3, (8192,) * 3]
            head, reps, inner = (batch * seq, student_cfg.d_model, vocab), 5, 10
        rows = bf16_matmul(square, reps=reps, inner=inner)
        head_row = bf16_matmul([head], reps=reps, inner=max(1, inner // 2))[0]
        peak = max(r["best_flops"] for r in rows)
        out["peak"]["measured_flops"] = peak
        return {"sizes": rows, "lm_head_shape": head_row, "peak_flops": peak}

    measure("matmul", m_matmul)
    if out["peak"]["measured_flops"] is None:
        print("  (no measured matmul peak: MFU only against the spec peak)", flush=True)

    # ---- 2. student plain CE
    measure("ce", lambda: train_measure("ce", lm_loss, text, "student_train"))

    # ---- 3. offline distillation from K=256 sampled targets
    def m_offline():
        t0 = time.perf_counter()
        source = "make_teacher_targets on the random-init teacher"
        try:
            program, _ = targets_program(batch)
            sample = setup.put({**text, "row_ids": np.arange(batch, dtype=np.int32)})
            targets = jax.device_get(program(teacher()[1], sample))
            del sample
        except Exception as e:  # noqa: BLE001 - fall back to random logits
            traceback.print_exc()
            source = f"sample_targets on random logits (teacher failed: {type(e).__name__})"
            logits = 3.0 * jax.random.normal(jax.random.key(3), (batch, seq, vocab), jnp.float32)
            targets = jax.device_get(
                jax.jit(
                    lambda lg: logit_store.sample_targets(
                        key=jax.random.key(4), logits=lg, method="sampled", k=K_SAMPLED
                    )
                )(logits)
            )
            del logits
        targets_s = time.perf_counter() - t0
        print(f"  offline targets ({source}) in {targets_s:.1f} s", flush=True)
        # The teacher stays for the later measurements unless it would crowd this step: the CE
        # step's compiled peak + the teacher's bytes above 90% of the device's limit.
        ce_peak = ((out["results"].get("ce") or {}).get("memory") or {}).get("peak_bytes")
        t_bytes = sum(x.nbytes for x in jax.tree.leaves(cache.get("params")))
        dropped = bool(limit and ce_peak and t_bytes and ce_peak + t_bytes > 0.9 * limit)
        if dropped:
            print(f"  dropping the teacher ({t_bytes / 2**30:.1f} GiB) for this step", flush=True)
            for key in ("graphdef", "params", "shardings"):
                cache.pop(key, None)
            gc.collect()
        loss_fn = make_loss(bd.distill_config(bd.OFFLINE_LOSS, online=False), teacher_graphdef=None)
        r = train_measure("offline", loss_fn, {**text, **targets}, "student_train")
        r["targets_source"] = source
        r["teacher_dropped_for_step"] = dropped
        r["targets_s"] = targets_s
        r["distinct_ids_per_token"] = float(targets["valid"].sum(-1).mean())
        r["targets_dtypes"] = {k: str(v.dtype) for k, v in targets.items()}
        return r

    measure("offline", m_offline)

    # ---- 4. teacher forward
    def m_teacher_forward():
        graphdef, params, _ = teacher()
        kw = lambda b: dict(positions=b["positions"], segment_ids=b["segment_ids"])
        fwd = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["inputs"], **kw(b)))
        dev_batch = setup.put(text)
        compiled, info = compile_timed("teacher_forward", fwd, params, dev_batch)
        once = lambda: jax.block_until_ready(compiled(params, dev_batch))
        r = timed("teacher_forward", once, batch * seq, fpt["teacher_forward"], info)
        r["batch"], r["seq"], r["teacher_init_s"] = batch, seq, cache.get("init_s")
        return r

    measure("teacher_forward", m_teacher_forward)

    # ---- 5. sample_logits (forward + K=256 sampling on the device)
    def m_sample_logits():
        _, params, _ = teacher()
        compiled, info = targets_program(batch)
        sample = setup.put({**text, "row_ids": np.arange(batch, dtype=np.int32)})
        once = lambda: jax.block_until_ready(compiled(params, sample))
        r = timed("sample_logits", once, batch * seq, fpt["teacher_forward"], info)
        r["batch"], r["seq"] = batch, seq
        gets = []
        for _ in range(3):
            y = jax.block_until_ready(compiled(params, sample))
            t0 = time.perf_counter()
            host = jax.device_get(y)
            gets.append(time.perf_counter() - t0)
        r["device_get_median_s"] = statistics.median(gets)
        r["targets_bytes"] = int(sum(v.nbytes for v in host.values()))
        fwd = out["results"].get("teacher_forward", {})
        if fwd.get("status") == "ok":
            r["overhead_vs_forward"] = r["median_s"] / fwd["median_s"] - 1.0
            print(
                f"  sampling overhead vs the forward: {r['overhead_vs_forward']:+.1%}", flush=True
            )
        return r

    measure("sample_logits", m_sample_logits)
    cache.pop(("targets", batch), None)

    # ---- 6. online distillation (teacher in the step, full_kl)
    def m_online():
        graphdef, params, shardings = teacher()
        loss_fn = make_loss(
            bd.distill_config(bd.ONLINE_LOSS, online=True), teacher_graphdef=graphdef
        )
        host = bd.text_batch(online_batch, seq, vocab)
        return train_measure("online", loss_fn, host, "online", extra=params, extra_sh=shardings)

    measure("online", m_online)

    out["total_runtime_s"] = time.perf_counter() - t_start
    save()
    print_table(out)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def print_table(out: dict) -> None:
    peak, spec = out["peak"]["measured_flops"], out["peak"]["spec_flops"]
    print(
        f"\nsummary: {out['machine']['device_kind']}, jax {out['machine']['jax']}, measured "
        f"bf16 matmul peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s"
        + (f" (spec {spec / 1e12:.0f})" if spec else "")
    )
    head = (
        "measurement", "b x t", "median ms", "tokens/s", "TFLOP/s", "MFU", "MFU spec",
        "compile s", "prog GiB", "dev peak GiB", "status",
    )  # fmt: skip
    gib = lambda x: f"{x / 2**30:.1f}" if x is not None else ""
    pct = lambda x: f"{x:.1%}" if x is not None else ""
    rows = []
    for name, r in out["results"].items():
        cell = dict.fromkeys(head, "")
        cell["measurement"] = name
        cell["dev peak GiB"] = gib((r.get("device_memory_after") or {}).get("peak_bytes_in_use"))
        if r["status"] != "ok":
            cell["status"] = r["error"][:70]
        elif name == "matmul":
            best = max(r["sizes"], key=lambda s: s["best_flops"])
            cell["b x t"] = f"{best['m']}x{best['k']}x{best['n']}"
            cell["median ms"] = f"{best['best_s'] * 1e3:.2f}"
            cell["TFLOP/s"] = f"{best['best_flops'] / 1e12:.1f}"
            cell["MFU spec"] = pct(peak / spec if spec else None)
            head_tf = r["lm_head_shape"]["best_flops"] / 1e12
            cell["status"] = f"ok (best, not median); LM-head shape {head_tf:.1f} TFLOP/s"
        else:
            cell["b x t"] = f"{r['batch']} x {r['seq']}"
            cell["median ms"] = f"{r['median_s'] * 1e3:.1f}"
            cell["tokens/s"] = f"{r['tokens_per_s']:,.0f}"
            cell["TFLOP/s"] = f"{r['model_flops_per_s'] / 1e12:.1f}"
            cell["MFU"], cell["MFU spec"] = pct(r["mfu"]), pct(r["mfu_spec"])
            cell["compile s"] = f"{r['compile_s']:.1f}"
            cell["prog GiB"] = gib((r.get("memory") or {}).get("peak_bytes"))
            cell["status"] = "ok"
            if "overhead_vs_forward" in r:
                cell["status"] += f"; overhead vs forward {r['overhead_vs_forward']:+.1%}"
        rows.append(tuple(cell[h] for h in head))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        cells = [
            c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip(), flush=True)
    print(f"total {out['total_runtime_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
