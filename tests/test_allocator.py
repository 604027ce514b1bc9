"""train/allocator.py: CPU runs re-execute themselves under mimalloc, once, keeping argv."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.allocator import mimalloc_library

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import os, sys; from train.allocator import use_fast_allocator; use_fast_allocator(); "
    "maps = open('/proc/self/maps').read(); "
    "print('mimalloc' if 'libmimalloc' in maps else 'system', sys.argv[1:])"
)


def _probe(env_update: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLAX_", "_DISTILLAX"))}
    env.pop("LD_PRELOAD", None)
    env.update(PYTHONPATH=str(ROOT), **env_update)
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=60
    )


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or mimalloc_library() is None,
    reason="mimalloc is installed (cmeel-mimalloc) on Linux only",
)


def test_cpu_process_reexecutes_under_mimalloc_with_its_arguments():
    out = _probe({"JAX_PLATFORMS": "cpu"}, "a", "--b=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "mimalloc ['a', '--b=1']"


def test_opt_out_and_accelerators_keep_the_system_allocator():
    for env in (
        {"JAX_PLATFORMS": "cpu", "DISTILLAX_ALLOCATOR": "system"},
        {"JAX_PLATFORMS": "cuda"},
    ):
        out = _probe(env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("system"), (env, out.stdout)


def test_bad_setting_is_a_clear_error():
    out = _probe({"DISTILLAX_ALLOCATOR": "tcmalloc"})
    assert out.returncode != 0
    assert "DISTILLAX_ALLOCATOR must be auto, system or mimalloc" in out.stderr
