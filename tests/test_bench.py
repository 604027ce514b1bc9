"""The benchmarks still run (smoke runs at toy settings) and write the keys issue 7 names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_distill_benchmark_quick_run(tmp_path):
    s = _run(["bench/distill.py", "--quick"], tmp_path)["summary"]
    for key in (
        "online_tokens_per_s",
        "offline_tokens_per_s",
        "ce_tokens_per_s",
        "teacher_forward_tokens_per_s",
        "sample_logits_tokens_per_s",
        "matmul_peak_flops",
        "mfu_online",
        "mfu_offline",
    ):
        assert s[key] > 0, key
    assert 0 < s["mfu_offline"] < 1 and s["memory_temp_ratio"] < 1.2


@pytest.mark.slow
def test_gpu_benchmark_runs_at_toy_shapes_on_cpu(tmp_path):
    results = _run(["bench/gpu.py", "--tiny", "--steps", "1"], tmp_path)["results"]
    names = ("matmul", "ce", "offline", "teacher_forward", "sample_logits", "online")
    assert {n: results[n]["status"][:2] for n in names} == {n: "ok" for n in names}
    assert all(results[n]["tokens_per_s"] > 0 for n in names[1:])
