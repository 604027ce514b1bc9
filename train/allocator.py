"""On a CPU-only Linux host, restart the process under mimalloc before any work is done.

Why: XLA:CPU allocates each step's buffers afresh (a training step's temporaries are hundreds
of MiB, a [tokens, vocab] float32 logits array alone 64 MiB in bench/distill.py), and glibc's
malloc hands every block over 32 MiB straight back to the kernel on free. The next step then
page-faults its whole working set in again, one zeroed 4 KiB page at a time: 140,000 faults
per student step in the benchmark, about a fifth of its time (a 64 MiB `exp` takes 22 ms with
glibc and 3.6 ms when its output buffer is reused). mimalloc keeps freed memory mapped for
reuse, so a steady training loop stops faulting (2,000 faults per step).

The allocator must be chosen before the process starts (LD_PRELOAD), so `launch.py` and the
benchmarks call `use_fast_allocator()` first thing and the process re-executes itself once,
with the same arguments. Nothing is imported or computed before that, so nothing is lost.
Skipped when a GPU or TPU is visible (their memory has its own allocator), off Linux, when the
library is missing, and with DISTILLAX_ALLOCATOR=system. Results are identical either way: only
where host memory comes from changes.
"""

from __future__ import annotations

import glob
import os
import sys

ENV = "DISTILLAX_ALLOCATOR"  # "auto" (default): mimalloc on CPU-only Linux; "system": glibc
_DONE = "_DISTILLAX_ALLOCATOR_SET"  # set in the re-executed process: never loop


def mimalloc_library() -> str | None:
    """Path of libmimalloc.so from the cmeel-mimalloc wheel, or None."""
    for entry in sys.path:
        hits = sorted(
            glob.glob(os.path.join(entry or ".", "cmeel.prefix", "lib", "libmimalloc.so*"))
        )
        if hits:
            return hits[0]
    return None


def _accelerator_visible() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*"))


def use_fast_allocator() -> None:
    """Re-execute this process under mimalloc where that helps (see the module docstring)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "system", "mimalloc"):
        raise SystemExit(f"error: {ENV} must be auto, system or mimalloc, got {choice!r}")
    if choice == "system" or os.environ.get(_DONE) or not sys.platform.startswith("linux"):
        return
    if choice == "auto" and _accelerator_visible():
        return
    lib = mimalloc_library()
    if lib is None:
        if choice == "mimalloc":
            raise SystemExit(
                f"error: {ENV}=mimalloc but libmimalloc.so was not found "
                "(pip install cmeel-mimalloc, or set it to system)"
            )
        return
    env = dict(os.environ)
    env[_DONE] = lib
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
