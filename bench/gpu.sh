#!/usr/bin/env bash
# One-shot GPU benchmark (bench/gpu.py) on a lent GPU machine with no network.
#
#   OUT=/some/folder bash bench/gpu.sh [extra bench/gpu.py flags]      # from the repo root
#
# The packages the image lacks travel as wheels in .whl/ (git-ignored, so the device call must
# carry it): pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions),
# grain, array-record, portpicker. .whl/pin/ holds flax 0.12.12 and optax 0.2.8: the repo's flax
# 0.12.8 does not import under jax 0.11.2 (jax.experimental.hijax.HiPrimitive is gone; flax
# >= 0.12.10 has the fix), and 0.12.12 + jax 0.11.2 ran bench/gpu.py --tiny on a CPU.
# .whl/fallback/ holds protobuf 7.36.2, used only if grain's generated code (protobuf 5.28.3)
# fails against the image's protobuf. The first PYTHONPATH that passes an import check (every
# module of bench/gpu.py + a small nnx/optax step on the CPU) is used.
# Writes $OUT/setup.log (versions, import check), $OUT/gpu.log and $OUT/gpu.json (rewritten
# after every measurement, so a run cut off at its time limit keeps what it measured).
# GPU_BENCH_TIMEOUT (seconds, default 470) bounds bench/gpu.py.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c "import jax" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3
fi
T0=$(date +%s)

{
    echo "== $(date -u) on $(hostname); python: $(command -v "$PY")"
    nvidia-smi || echo "nvidia-smi failed"
    echo "== the image's versions (before our wheels)"
    "$PY" - <<'EOF'
import importlib.metadata as md
import sys
print(sys.version)
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "tensorstore", "treescope", "numpy", "ml-dtypes", "protobuf",
          "typing-extensions", "etils", "absl-py", "cloudpickle", "tokenizers", "pyyaml", "tqdm",
          "rich", "msgpack", "pydantic", "grain", "array-record"):
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d} (not installed)")
EOF
    echo "== installing wheels"
    rm -rf /tmp/site /tmp/pin /tmp/fallback
    ls -la .whl .whl/pin .whl/fallback
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "WHEEL INSTALL FAILED (.whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pin .whl/pin/*.whl || echo "WHEEL INSTALL FAILED (.whl/pin)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fallback .whl/fallback/*.whl || echo "WHEEL INSTALL FAILED (.whl/fallback)"
    echo "install done at +$(($(date +%s) - T0)) s"
} 2>&1 | tee "$OUT/setup.log"

# The import check: every module bench/gpu.py pulls in, then a small nnx + optax step on the CPU
# (cheap; exercises flax against this jax without touching the GPU).
check() {
    JAX_PLATFORMS=cpu "$PY" - <<'EOF'
import importlib
import sys

missing = []
for m in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
          "grain", "array_record.python.array_record_module", "portpicker", "flax", "optax",
          "orbax.checkpoint", "tensorstore", "treescope", "msgpack", "yaml", "tqdm", "rich",
          "tokenizers", "ml_dtypes", "numpy", "etils", "absl", "cloudpickle", "google.protobuf",
          "prometheus_client", "humanize", "simplejson", "uvloop", "opt_einsum", "filelock"):
    try:
        mod = importlib.import_module(m)
        top = sys.modules[m.split(".")[0]]
        print(f"  ok {m} {getattr(top, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        missing.append(m)
        print(f"  MISSING {m}: {type(e).__name__}: {e}")
sys.path.insert(0, "bench")
try:
    import gpu  # noqa: F401 - the whole import graph of the benchmark

    print("  ok: import bench/gpu.py")
except Exception as e:  # noqa: BLE001
    import traceback

    traceback.print_exc()
    print(f"  FAILED: import bench/gpu.py: {type(e).__name__}: {e}")
    sys.exit(1)
import jax
import jax.numpy as jnp
import optax
from flax import nnx

model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model, nnx.Param)
params = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
tx = optax.adamw(1e-3)
opt = tx.init(params)


@jax.jit
def step(p, o, x):
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2)
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o


params, opt = step(params, opt, jnp.ones((4, 8)))
jax.block_until_ready(params)
print("  ok: nnx + optax step on CPU")
if missing:
    print(f"  (not importable, but bench/gpu.py imported without them: {missing})")
EOF
}

{
    # The first of these that passes the check is used: our flax/optax (tested with jax 0.11.2
    # on a CPU), then with our protobuf too (grain's generated code needs protobuf >= 5.28.3),
    # then the image's flax/optax. None passing: the first, and bench/gpu.py's errors tell.
    chosen=""
    for path in "/tmp/pin:/tmp/site:$PWD" "/tmp/pin:/tmp/site:/tmp/fallback:$PWD" \
        "/tmp/site:$PWD" "/tmp/site:/tmp/fallback:$PWD"; do
        echo "== import check, PYTHONPATH=$path"
        if PYTHONPATH=$path check; then
            chosen=$path
            break
        fi
    done
    if [ -z "$chosen" ]; then
        chosen="/tmp/pin:/tmp/site:$PWD"
        echo "IMPORT CHECK FAILED everywhere: running with $chosen anyway"
    fi
    echo "USING PYTHONPATH=$chosen"
    echo "$chosen" >/tmp/gpu-bench-pythonpath
    echo "checks done at +$(($(date +%s) - T0)) s"
} 2>&1 | tee -a "$OUT/setup.log"

export PYTHONPATH=$(cat /tmp/gpu-bench-pythonpath)
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
set -o pipefail
echo "== bench/gpu.py (PYTHONPATH=$PYTHONPATH, timeout ${GPU_BENCH_TIMEOUT:-470} s)" | tee "$OUT/gpu.log"
timeout -k 10 "${GPU_BENCH_TIMEOUT:-470}" "$PY" bench/gpu.py --json "$OUT/gpu.json" "$@" 2>&1 |
    tee -a "$OUT/gpu.log"
rc=$?
echo "== bench/gpu.py exit $rc (124: timed out) after $(($(date +%s) - T0)) s in all" |
    tee -a "$OUT/gpu.log"
exit $rc
