"""Join a multi-process (multi-host) job: decide from the environment, then jax.distributed.

    from train.distributed import config_section, maybe_initialize
    maybe_initialize(config_section("configs/quickstart.yaml", overrides))  # before any jax use

One process runs per host (TPU VM, CPU) or per GPU (SLURM, one task per GPU). It is a process
of several when, in this order:

1. the config's `distributed:` section, or the environment variables JAX_COORDINATOR_ADDRESS,
   JAX_NUM_PROCESSES and JAX_PROCESS_ID, give the coordinator (host:port of process 0), the
   number of processes and this one's id (explicit values win over the environment);
2. it is a task of a SLURM job step with several tasks (`srun`): jax reads SLURM_* itself;
3. it is a worker of a multi-host TPU slice (GKE's TPU_WORKER_HOSTNAMES lists several hosts),
   or DISTILLAX_DISTRIBUTED=auto asks for jax's own cluster detection (a TPU VM pod slice
   launched with `gcloud ... ssh --worker=all`).

DISTILLAX_DISTRIBUTED=off turns all of this off. Once initialized, `jax.devices()` lists every
process's devices, so a mesh spans all hosts; the data pipeline gives each process its share of
every batch, only process 0 writes the manifest, metrics and report, and orbax checkpoints are
written by all processes together (every process must see the same run directory: a shared
filesystem, or one local disk for local processes). See docs/multihost.md.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DistributedConfig(BaseModel):
    """The optional `distributed:` section; unset fields come from the environment."""

    model_config = ConfigDict(extra="forbid")

    coordinator_address: str | None = None
    """host:port of process 0, reachable from every process"""
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)


def config_section(path: str, overrides: list[str] = ()) -> dict | None:
    """The raw `distributed:` section of a config file with its overrides applied.

    Read before the config is validated, because validation counts devices, and jax must join
    the job before anything touches a device. Any problem here is left for `load_config` to
    report properly (as exit status 2), so this returns None then.
    """
    from train.config import ConfigError, apply_override, parse_override, read_yaml

    try:
        raw = read_yaml(path)
        for text in overrides:
            keys, value = parse_override(text)
            if keys[0] == "distributed":
                apply_override(raw, keys, value, text=text)
    except ConfigError:
        return None
    section = raw.get("distributed")
    return section if isinstance(section, dict) else None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def detect(cfg_distributed: dict | DistributedConfig | None = None) -> dict[str, Any] | None:
    """The keyword arguments for jax.distributed.initialize, or None for a single process.

    {} means "let jax detect the cluster" (SLURM, TPU); otherwise the explicit coordinator,
    process count and id.
    """
    mode = os.environ.get("DISTILLAX_DISTRIBUTED", "").lower()
    if mode in ("off", "0", "false", "no"):
        return None
    cfg = (
        cfg_distributed
        if isinstance(cfg_distributed, DistributedConfig)
        else DistributedConfig.model_validate(cfg_distributed or {})
    )
    explicit = {
        "coordinator_address": cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": cfg.num_processes or _env_int("JAX_NUM_PROCESSES"),
        "process_id": cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID"),
    }
    if explicit["num_processes"] is not None and explicit["num_processes"] > 1:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"distributed: num_processes={explicit['num_processes']} but "
                f"{' and '.join(missing)} not set (config `distributed:` or JAX_COORDINATOR_ADDRESS"
                ", JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        return explicit
    if explicit["num_processes"] == 1:
        return None  # said explicitly: one process
    if explicit["coordinator_address"]:
        # A coordinator without a count: jax fills the rest from the cluster (SLURM, TPU).
        return {k: v for k, v in explicit.items() if v is not None}
    # A SLURM job step (srun) with several tasks; jax's SlurmCluster reads the same variables.
    # SLURM_STEP_NODELIST is only set inside a step, so a batch script that runs python directly
    # (one process, whatever --ntasks says) is not mistaken for one of several.
    slurm_tasks = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if (
        slurm_tasks is not None
        and slurm_tasks > 1
        and all(
            v in os.environ
            for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
        )
    ):
        return {}
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or mode == "auto":
        return {}
    return None


def maybe_initialize(cfg_distributed: dict | DistributedConfig | None = None) -> bool:
    """Call jax.distributed.initialize() if this is one process of several; True if it did.

    Must run before anything touches a jax device (it is the first thing launch.py does).
    """
    kwargs = detect(cfg_distributed)
    if kwargs is None:
        return False
    import jax

    # CPU processes need a cross-process collectives backend (gloo); it is jax's default today,
    # but set it explicitly so an older default ("none") cannot make the mesh span one process.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
