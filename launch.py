"""The one entry point: run a pipeline from YAML, resuming where it stopped.

    python launch.py CONFIG.yaml [dotted.key=value ...] [--dry-run] [--fresh]

--dry-run validates, prints the resolved config and the plan (what runs, what is done, what
resumes) and exits. --fresh discards the run directory and starts over. A bad config exits
with status 2 and one line per problem, before anything is computed or written.
"""

from __future__ import annotations

import argparse
import os
import sys


def maybe_initialize_distributed() -> None:
    """Join a multi-process job when the environment says this is one process of several."""
    if (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    ):
        import jax

        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch.py", description="Run a distillax pipeline from a YAML config."
    )
    parser.add_argument("config", help="pipeline YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (values parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    parser.add_argument("--fresh", action="store_true", help="discard the run directory first")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    maybe_initialize_distributed()
    from train.config import ConfigError, dump_yaml, load_config
    from train.pipeline import Manifest, describe_plan, plan, run_pipeline

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            manifest = Manifest(cfg.run_dir / "manifest.json")
            items = (
                plan(cfg, Manifest(cfg.run_dir / "__none__")) if args.fresh else plan(cfg, manifest)
            )
            print(dump_yaml(cfg.to_dict()))
            print(f"run directory: {cfg.run_dir}")
            print(describe_plan(items))
            return 0
        return run_pipeline(cfg, fresh=args.fresh)
    except ConfigError as e:
        for line in e.messages:
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
