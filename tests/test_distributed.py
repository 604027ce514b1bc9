"""When launch.py joins a jax.distributed job (train/distributed.py); the job itself is
tested end to end in tests/test_multihost.py."""

from pathlib import Path

import pytest

from train.config import ConfigError, load_config
from train.distributed import config_section, detect

ENV = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "DISTILLAX_DISTRIBUTED",
    "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
    "SLURM_PROCID", "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES",
)  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_single_process_by_default(env):
    assert detect() is None
    env.setenv("JAX_NUM_PROCESSES", "1")
    assert detect() is None


def test_explicit_environment_and_config(env):
    env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    env.setenv("JAX_NUM_PROCESSES", "2")
    env.setenv("JAX_PROCESS_ID", "1")
    assert detect() == dict(coordinator_address="localhost:1234", num_processes=2, process_id=1)
    # the config wins key by key
    got = detect({"coordinator_address": "host0:99", "process_id": 0})
    assert got == dict(coordinator_address="host0:99", num_processes=2, process_id=0)
    env.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="process_id not set"):
        detect()
    env.setenv("DISTILLAX_DISTRIBUTED", "off")
    assert detect() is None


def test_slurm_step_with_several_tasks_is_autodetected(env):
    for k, v in dict(
        SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="0"
    ).items():
        env.setenv(k, v)
    assert detect() is None  # the batch script itself (no srun step): one process
    env.setenv("SLURM_STEP_NODELIST", "node[001-002]")
    assert detect() == {}  # jax reads SLURM_* itself
    env.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert detect() is None


def test_tpu_hosts(env):
    env.setenv("TPU_WORKER_HOSTNAMES", "w0")
    assert detect() is None
    env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert detect() == {}


def test_distributed_config_section(tmp_path):
    base = (Path(__file__).parent / "configs/base.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(base + "distributed: {coordinator_address: 'h:1', num_processes: 2}\n")
    assert config_section(str(path), ["distributed.process_id=1"]) == {
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
    }
    load_config(path)  # a valid top-level key
    with pytest.raises(ConfigError, match="distributed.num_processes"):
        load_config(path, ["distributed.num_processes=0"])
    assert config_section(str(tmp_path / "missing.yaml")) is None
