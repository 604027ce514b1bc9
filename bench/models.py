"""Model benchmarks: KV-cache memory, CPU forward throughput, compile time with and without scan.

    PYTHONPATH=. .venv/bin/python bench/models.py [--json PATH] [--quick]

(a) KV cache at 32k context (batch 1, bfloat16) for Gemma 3 1B and 4B, taken from the shapes of
    the real cache (`jax.eval_shape` of `model.init_cache` on an abstract model, so nothing is
    allocated), against the same models with every layer global; bf16 weight bytes from the
    abstract parameters. Printed next to the Gemma 3 report (Table 3 and Figure 5).
(b) Forward tokens/s of a tiny preset on this CPU: jitted, warmed up, median of several runs,
    each ending in `block_until_ready`.
(c) Compile time of a forward + backward step (cross-entropy, `jax.value_and_grad`) at Gemma 3
    1B shapes, lowered from ShapeDtypeStructs (`nnx.eval_shape` + `nnx.split`: no weights), with
    `scan_layers` on and off, over several depths.

Results and the machine they came from are in `bench/README.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.models.config import ModelConfig
from train.models.gemma import Transformer
from train.models.presets import get_preset

CONTEXT = 32_768
GB = 1e9

# Gemma 3 report, Table 3: bf16 weights and weights + KV cache at 32,768 context (GB).
REPORT_TABLE3 = {"gemma3-1b": (2.0, 2.9), "gemma3-4b": (8.0, 12.7)}
# Gemma 3 report, Figure 5 (a 2B model at 32k): KV memory overhead of global-only attention
# is about 60%; with 1 global per 3 local layers and a 1024 window it is under 15%.
REPORT_FIG5 = {"global_only": 0.60, "local_3_to_1_w1024": 0.15}


def abstract_model(cfg: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def tree_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kv_cache_row(name: str, cfg: ModelConfig) -> dict:
    """Bytes of the decoding cache at CONTEXT tokens and of the bf16 weights, for one config."""
    model = abstract_model(cfg)
    cache = jax.eval_shape(lambda: model.init_cache(batch=1, max_len=CONTEXT, dtype=jnp.bfloat16))
    kv = tree_bytes(
        [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache) if _is_kv(path)]
    )
    total_cache = tree_bytes(cache)  # + the int32 slot positions
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    weights = 2 * n_params
    kinds = cfg.layer_kinds
    return {
        "model": name,
        "layers_global": kinds.count("global"),
        "layers_local": kinds.count("local"),
        "window": cfg.sliding_window,
        "weights_bf16_gb": weights / GB,
        "kv_gb": kv / GB,
        "cache_total_gb": total_cache / GB,
        "kv_over_weights": kv / weights,
        "kv_over_total": kv / (weights + kv),
    }


def _is_kv(path) -> bool:
    return getattr(path[-1], "key", None) in ("k", "v")


def bench_kv() -> list[dict]:
    rows = []
    for name in ("gemma3-1b", "gemma3-4b"):
        cfg = get_preset(name)
        rows.append(kv_cache_row(name, cfg))
        rows.append(kv_cache_row(f"{name} all-global", get_preset(name, layer_pattern=("global",))))
    # Figure 5's "1:3, sw=1024" (one global layer per three local ones) on the 4B shapes.
    pattern = ("local", "local", "local", "global")
    rows.append(
        kv_cache_row(
            "gemma3-4b 3:1 w1024",
            get_preset("gemma3-4b", layer_pattern=pattern, sliding_window=1024),
        )
    )
    return rows


def bench_forward(
    name: str = "gemma3-tiny-teacher", batch: int = 8, seq: int = 256, runs: int = 10
):
    cfg = get_preset(name)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    fwd(state, tokens).block_until_ready()
    first = time.perf_counter() - t0
    fwd(state, tokens).block_until_ready()  # one more warm-up run
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fwd(state, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "model": name,
        "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "batch": batch,
        "seq": seq,
        "runs": runs,
        "first_call_s": first,
        "median_s": med,
        "min_s": min(times),
        "tokens_per_s": batch * seq / med,
    }


def compile_step(cfg: ModelConfig, *, batch: int, seq: int) -> dict:
    """Lower and compile value_and_grad of the next-token loss from abstract shapes only."""
    graphdef, state = nnx.split(abstract_model(cfg))

    def loss_fn(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    lowered = step.lower(state, tokens)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo_lines = compiled.as_text().count("\n")
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_lines": hlo_lines}


def bench_compile(
    depths: tuple[int, ...], *, repeats: int, batch: int = 1, seq: int = 512
) -> list[dict]:
    """Best of `repeats` (a fresh jit each time, so nothing is served from a cache)."""
    rows = []
    for num_layers in depths:
        for scan in (True, False):
            cfg = get_preset("gemma3-1b", num_layers=num_layers, scan_layers=scan)
            runs = [compile_step(cfg, batch=batch, seq=seq) for _ in range(repeats)]
            r = min(runs, key=lambda r: r["lower_s"] + r["compile_s"])
            rows.append({"num_layers": num_layers, "scan_layers": scan, "repeats": repeats, **r})
            print(
                f"  layers {num_layers:3d} scan={scan!s:5}: lower {r['lower_s']:5.1f} s, "
                f"compile {r['compile_s']:5.1f} s, {r['hlo_lines']:6d} HLO lines",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="fewer depths and runs")
    args = parser.parse_args()
    t_start = time.perf_counter()
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        }
    }

    print(f"(a) KV cache at {CONTEXT} tokens, batch 1, bfloat16 (GB = 1e9 bytes)")
    out["kv_cache"] = bench_kv()
    print(
        f"  {'model':22s} {'glob':>4s} {'loc':>4s} {'win':>5s} {'weights':>8s} {'KV':>7s} "
        f"{'KV/weights':>10s} {'KV/(w+KV)':>9s} {'w+KV':>6s}"
    )
    for r in out["kv_cache"]:
        print(
            f"  {r['model']:22s} {r['layers_global']:4d} {r['layers_local']:4d} "
            f"{r['window'] or 0:5d} {r['weights_bf16_gb']:8.2f} {r['kv_gb']:7.3f} "
            f"{r['kv_over_weights']:10.1%} {r['kv_over_total']:9.1%} "
            f"{r['weights_bf16_gb'] + r['kv_gb']:6.2f}"
        )
    for name, (w, wkv) in REPORT_TABLE3.items():
        print(f"  report Table 3 {name}: weights {w} GB, weights+KV {wkv} GB (KV {wkv - w:.1f} GB)")
    print(
        f"  report Fig. 5 (2B model, 32k): global-only ~{REPORT_FIG5['global_only']:.0%} "
        f"KV overhead, 1 global : 3 local with window 1024 <{REPORT_FIG5['local_3_to_1_w1024']:.0%}"
    )

    print("(b) forward throughput on this CPU")
    out["forward"] = [bench_forward(runs=5 if args.quick else 10)]
    for r in out["forward"]:
        print(
            f"  {r['model']} ({r['params'] / 1e6:.1f}M params) batch {r['batch']} x seq "
            f"{r['seq']}: median {r['median_s'] * 1e3:.1f} ms over {r['runs']} runs -> "
            f"{r['tokens_per_s']:,.0f} tokens/s (first call, with compile: "
            f"{r['first_call_s']:.1f} s)"
        )

    depths = (6, 26) if args.quick else (6, 12, 26, 48)
    repeats = 1 if args.quick else 2
    print(
        f"(c) compile time of forward+grad at gemma3-1b shapes (batch 1 x seq 512), "
        f"best of {repeats}"
    )
    out["compile"] = bench_compile(depths, repeats=repeats)
    out["total_runtime_s"] = time.perf_counter() - t_start
    print(f"total {out['total_runtime_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    from train.allocator import use_fast_allocator

    use_fast_allocator()  # as launch.py does: mimalloc on a CPU-only host
    main()
