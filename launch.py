"""The one entry point: run a pipeline from YAML, resuming where it stopped.

    python launch.py CONFIG.yaml [dotted.key=value ...] [--dry-run] [--fresh]

--dry-run validates, prints the resolved config and the plan (what runs, what is done, what
resumes) and exits. A config with a `sweep:` section runs a sweep (train/sweep.py; `--trial ID`
runs one of its trials). --fresh discards the run directory and starts over. A bad config exits
with status 2 and one line per problem, before anything is computed or written.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch.py", description="Run a distillax pipeline from a YAML config."
    )
    parser.add_argument("config", help="pipeline YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (values parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    parser.add_argument("--fresh", action="store_true", help="discard the run directory first")
    parser.add_argument("--trial", help="a sweep config: run only this trial (e.g. t003)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    from train.distributed import config_section, maybe_initialize

    maybe_initialize(config_section(args.config, args.overrides))  # before any device use
    from train.config import ConfigError, dump_yaml, load_config, read_yaml
    from train.memory import describe_memory
    from train.pipeline import Manifest, describe_plan, plan, run_pipeline

    try:
        raw = read_yaml(args.config)
        if "sweep" in raw:  # a sweep: train/sweep.py runs its trials (and describes them)
            from train.sweep import run_sweep

            return run_sweep(raw, source=args.config, overrides=args.overrides, trial=args.trial,
                             fresh=args.fresh, dry_run=args.dry_run)  # fmt: skip
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            manifest = Manifest(cfg.run_dir / "manifest.json")
            items = (
                plan(cfg, Manifest(cfg.run_dir / "__none__")) if args.fresh else plan(cfg, manifest)
            )
            print(dump_yaml(cfg.to_dict()))
            print(f"run directory: {cfg.run_dir}")
            print(describe_plan(items))
            print(describe_memory(cfg))
            return 0
        return run_pipeline(cfg, fresh=args.fresh)
    except ConfigError as e:
        for line in e.messages:
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from train.allocator import use_fast_allocator

    use_fast_allocator()  # re-executes under mimalloc on a CPU-only host (train/allocator.py)
    sys.exit(main())
