"""Hyperparameter sweeps: many trials of one pipeline, each a normal run directory.

    python launch.py configs/sweeps/quickstart_lr.yaml            # all trials, one after another
    python launch.py configs/sweeps/quickstart_lr.yaml --trial t002   # one trial (array jobs)
    python launch.py configs/sweeps/quickstart_lr.yaml --dry-run  # trials, validity, shared stages

A pipeline YAML with a `sweep:` section is a sweep:

    sweep:
      method: grid                      # grid | random | optuna
      params:                           # dotted key -> values or a range
        stages.student.optim.lr: [1.0e-3, 3.0e-3]          # a list (grid) / a choice
        stages.student.loss.temperature: {uniform: [0.5, 2.0]}   # also loguniform, int, choice
      trials: 8                         # random and optuna
      metric: stages.student.metrics.eval_loss
      goal: minimize
      seed: 0

Layout under `runs/<run.name>/`: `shared/` is a run holding the stages whose config hash is the
same in every trial (a teacher, its logit store): they run once and every trial's manifest is
seeded with their entries, so the trial's plan skips them and reads their (absolute) artifacts.
`trials/<id>/` is a normal run (manifest, resume) plus `trial.json` (its params); `summary.md`,
`summary.csv` (sorted by the metric) and `sweep_<param>.png` are rewritten after every trial.
Running the same command again skips finished trials and resumes the interrupted one.

optuna keeps its study in `optuna.db` (SQLite) in the sweep directory unless `storage:` names
another database (e.g. postgresql://... shared by the workers of a cluster); several workers may
run the same command against one study. A trial interrupted while RUNNING is resumed (same
params, same directory) before new ones are asked for. With `pruner: median` each held-out
evaluation of the metric's stage is reported to optuna and a trial it prunes stops there.

Concurrency: each trial is run under an exclusive lock file (`trials/<id>/.lock`), the shared
stages under `shared.lock`, so array-job workers never run the same trial twice at once.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import io
import itertools
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.config import (
    TOP_LEVEL,
    ConfigError,
    PipelineConfig,
    apply_override,
    parse_config,
    parse_override,
    read_yaml,
)

RANGE_KINDS = ("uniform", "loguniform", "int")
METRIC_RE = re.compile(r"^stages\.([^.]+)\.metrics\.(.+)$")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["grid", "random", "optuna"] = "grid"
    params: dict[str, Any]
    """dotted key -> a list of values, or one of {uniform: [lo, hi]}, {loguniform: [lo, hi]},
    {int: [lo, hi]} (inclusive), {choice: [...]}"""
    trials: int | None = Field(None, gt=0)
    """number of trials (random: draws; optuna: completed trials); grid: the product"""
    metric: str
    """stages.<stage>.metrics.<key>: the number in a trial's manifest to sort and optimise by"""
    goal: Literal["minimize", "maximize"] = "minimize"
    seed: int = 0
    storage: str | None = None
    """optuna only: a database URL; default sqlite:///<sweep dir>/optuna.db"""
    pruner: Literal["none", "median"] = "none"
    """optuna only: median stops a trial whose intermediate metric is worse than the median"""

    @model_validator(mode="after")
    def _check(self):
        problems = []
        if not self.params:
            problems.append("params: at least one swept key is needed")
        for key, spec in self.params.items():
            problems += [f"params.{key}: {p}" for p in _spec_problems(spec, self.method)]
        if self.method in ("random", "optuna") and self.trials is None:
            problems.append(f"trials: required for method {self.method!r}")
        if not METRIC_RE.match(self.metric):
            problems.append(f"metric: expected stages.<stage>.metrics.<key>, got {self.metric!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def metric_stage(self) -> str:
        return METRIC_RE.match(self.metric).group(1)

    @property
    def metric_key(self) -> str:
        return METRIC_RE.match(self.metric).group(2)


def _spec_problems(spec, method: str) -> list[str]:
    if isinstance(spec, list):
        return [] if spec else ["an empty list of values"]
    if not isinstance(spec, dict) or len(spec) != 1:
        return ["expected a list of values or one of {uniform|loguniform|int|choice: [...]}"]
    ((kind, args),) = spec.items()
    if kind == "choice":
        return [] if isinstance(args, list) and args else ["choice: expected a non-empty list"]
    if kind not in RANGE_KINDS:
        return [f"unknown spec {kind!r}; valid: uniform, loguniform, int, choice"]
    if method == "grid":
        return [f"{kind} is a range; grid needs a list of values (or use random / optuna)"]
    if not (isinstance(args, list) and len(args) == 2):
        return [f"{kind}: expected [lo, hi]"]
    lo, hi = args
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in args) or lo >= hi:
        return [f"{kind}: expected numbers lo < hi, got {args!r}"]
    if kind == "loguniform" and lo <= 0:
        return [f"loguniform: lo must be > 0, got {lo!r}"]
    if kind == "int" and not all(isinstance(x, int) for x in args):
        return [f"int: expected integers, got {args!r}"]
    return []


def _values(spec) -> list | None:
    """The discrete values of a list / choice spec; None for a range."""
    if isinstance(spec, list):
        return spec
    kind, args = next(iter(spec.items()))
    return args if kind == "choice" else None


def _extremes(spec) -> tuple[Any, Any]:
    values = _values(spec)
    if values is not None:
        return values[0], values[-1]
    return tuple(next(iter(spec.values())))


def _range_kind(spec) -> str | None:
    return None if _values(spec) is not None else next(iter(spec))


# ---------------------------------------------------------------------------------------------
# expansion


def expand_grid(sweep: SweepConfig) -> list[dict]:
    """The cartesian product, first key slowest, in the YAML order of keys and values."""
    keys = list(sweep.params)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(_values(sweep.params[k]) for k in keys))
    ]


def draw(spec, rng: random.Random):
    values = _values(spec)
    if values is not None:
        return rng.choice(values)
    kind, (lo, hi) = next(iter(spec.items()))
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(lo, hi)


def expand_random(sweep: SweepConfig) -> list[dict]:
    """`trials` seeded draws: the same seed gives the same trials."""
    rng = random.Random(sweep.seed)
    return [{k: draw(s, rng) for k, s in sweep.params.items()} for _ in range(sweep.trials)]


def suggest(trial, sweep: SweepConfig) -> dict:
    """Optuna's suggestion for every swept key."""
    out = {}
    for key, spec in sweep.params.items():
        values = _values(spec)
        if values is not None:
            out[key] = trial.suggest_categorical(key, values)
            continue
        kind, (lo, hi) = next(iter(spec.items()))
        if kind == "int":
            out[key] = trial.suggest_int(key, lo, hi)
        else:
            out[key] = trial.suggest_float(key, lo, hi, log=kind == "loguniform")
    return out


def trial_id(index: int) -> str:
    return f"t{index:03d}"


# ---------------------------------------------------------------------------------------------
# configs


def _sweep_errors(e: ValidationError, source: str) -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            lines.append(f"{source}: sweep.{loc}: {msg}")
        else:  # the model validator: one "key: problem" per line
            lines += [f"{source}: sweep.{m}" for m in msg.split("\n")]
    return lines


class Sweep:
    """The base config, the sweep spec and the directories of one sweep."""

    def __init__(self, raw: dict, *, source: str, num_devices: int | None = None):
        raw = copy.deepcopy(raw)
        spec = raw.pop("sweep")
        self.source, self.num_devices = source, num_devices
        try:
            self.spec = SweepConfig.model_validate(spec if isinstance(spec, dict) else {})
        except ValidationError as e:
            raise ConfigError(_sweep_errors(e, source)) from None
        self.base_raw = raw
        self.base = parse_config(raw, source=source, num_devices=num_devices)
        self._check_keys(raw)
        self.name = self.base.run.name
        self.dir = Path(self.base.run.dir) / self.name

    def _check_keys(self, raw: dict) -> None:
        errors = []
        stages = raw.get("stages") or {}
        for key in self.spec.params:
            parts = key.split(".")
            if parts[0] not in TOP_LEVEL or len(parts) < 2:
                errors.append(
                    f"{self.source}: sweep.params.{key}: not a key of the pipeline "
                    f"(it must start with one of {', '.join(TOP_LEVEL)})"
                )
            elif parts[0] == "run":
                errors.append(f"{self.source}: sweep.params.{key}: run.* is set per trial")
            elif parts[0] == "stages" and parts[1] not in stages:
                errors.append(
                    f"{self.source}: sweep.params.{key}: unknown stage {parts[1]!r}; "
                    f"valid: {', '.join(stages)}"
                )
        if self.spec.metric_stage not in stages:
            errors.append(
                f"{self.source}: sweep.metric: unknown stage "
                f"{self.spec.metric_stage!r}; valid: {', '.join(stages)}"
            )
        if errors:
            raise ConfigError(errors)

    # -- per-trial configs

    def trial_raw(self, tid: str, params: dict) -> dict:
        raw = copy.deepcopy(self.base_raw)
        for key, value in params.items():
            path = [int(p) if p.isdigit() else p for p in key.split(".")]
            apply_override(raw, path, value, text=f"sweep.params.{key}={value!r}")
        raw["run"] = {**(raw.get("run") or {}), "dir": str(self.dir / "trials"), "name": tid}
        return raw

    def trial_config(self, tid: str, params: dict) -> PipelineConfig:
        raw = self.trial_raw(tid, params)
        try:
            return parse_config(
                raw,
                source=f"{self.source} [trial {tid}: {_fmt_params(params)}]",
                num_devices=self.num_devices,
            )
        except ConfigError as e:
            raise ConfigError(e.messages) from None

    def trial_dir(self, tid: str) -> Path:
        return self.dir / "trials" / tid

    # -- shared stages

    def shared_stages(self, configs: list[PipelineConfig]) -> list[str]:
        """Stages whose hash is the same in every config (so also their upstream stages)."""
        first = configs[0]
        return [
            s
            for s in first.order
            if all(s in c.stages and c.stage_hash(s) == first.stage_hash(s) for c in configs)
        ]

    def shared_config(self, stages: list[str], params: dict) -> PipelineConfig | None:
        """The run of the shared stages, from one trial's config (`params`: a swept key may
        set a shared stage's value, as long as it sets the same value in every trial)."""
        if not stages:
            return None
        raw = self.trial_raw("shared", params)
        raw["stages"] = {k: v for k, v in raw["stages"].items() if k in stages}
        raw["run"] = {**(raw.get("run") or {}), "dir": str(self.dir), "name": "shared"}
        return parse_config(raw, source=f"{self.source} [shared]", num_devices=self.num_devices)


def _fmt_params(params: dict) -> str:
    """`optim.lr=0.001, loss.temperature=2` (the last two parts of each key)."""
    return ", ".join(f"{'.'.join(k.split('.')[-2:])}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def with_base(raw: dict, *, source: str) -> dict:
    """A sweep file that names `base: pipeline.yaml` (relative to itself): its other keys are
    merged over that pipeline, mapping by mapping; a null value drops the key (e.g. a stage)."""
    raw = copy.deepcopy(raw)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str):
        raise ConfigError([f"{source}: base: expected the path of a pipeline YAML"])
    return _merge(read_yaml(Path(source).parent / base), raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# running


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True):
    """An exclusive flock on `path`; yields False (without waiting) when not blocking and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_done(cfg: PipelineConfig) -> bool:
    """Every stage of the run is done with the config hash it has now."""
    path = cfg.run_dir / "manifest.json"
    if not path.exists():
        return False
    stages = json.loads(path.read_text())["stages"]
    return all(
        stages.get(s, {}).get("status") == "done"
        and stages[s].get("config_hash") == cfg.stage_hash(s)
        for s in cfg.order
    )


def run_shared(shared: PipelineConfig | None, *, fresh: bool, log) -> bool:
    """Run the shared stages once (under a lock); True when they are all done."""
    from train.pipeline import run_pipeline

    if shared is None:
        return True
    with file_lock(shared.run_dir.parent / "shared.lock"):
        if is_done(shared) and not fresh:
            return True
        log(f"=== shared stages: {', '.join(shared.order)} in {shared.run_dir}")
        run_pipeline(shared, fresh=fresh, log=log)
        return is_done(shared)


def seed_manifest(cfg: PipelineConfig, shared: PipelineConfig | None) -> None:
    """Give a trial the shared stages' manifest entries, so that its plan skips them."""
    from train.pipeline import Manifest

    if shared is None:
        return
    src = Manifest(shared.run_dir / "manifest.json")
    dst = Manifest(cfg.run_dir / "manifest.json")
    for name in shared.order:
        entry = copy.deepcopy(src.data["stages"][name])
        assert entry["config_hash"] == cfg.stage_hash(name), name
        entry["stage_dir"] = str((shared.run_dir / name).absolute())
        if dst.data["stages"].get(name) != entry:
            dst.data["stages"][name] = entry
    dst.data.setdefault("run", cfg.run.name)
    dst.save()
    # the same tokenizer file the shared stages used (BPE is cached by corpus and vocab size)
    tok = shared.run_dir / "tokenizer"
    if tok.exists():
        shutil.copytree(tok, cfg.run_dir / "tokenizer", dirs_exist_ok=True)


def run_trial(cfg: PipelineConfig, shared, params: dict, *, fresh: bool, log) -> str:
    """Run one trial; returns "done", "skipped" (already done), "busy" (locked by another
    worker) or "interrupted"."""
    from train.pipeline import atomic_write, run_pipeline

    with file_lock(cfg.run_dir / ".lock", blocking=False) as got:
        if not got:
            log(f"=== trial {cfg.run.name}: another worker is running it, skipped")
            return "busy"
        if fresh:
            for p in cfg.run_dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if is_done(cfg):
            return "skipped"
        atomic_write(
            cfg.run_dir / "trial.json",
            json.dumps({"trial": cfg.run.name, "params": params}, indent=2) + "\n",
        )
        seed_manifest(cfg, shared)
        log(f"=== trial {cfg.run.name}: {_fmt_params(params)}")
        run_pipeline(cfg, fresh=False, log=log)
        return "done" if is_done(cfg) else "interrupted"


def metric_of(sweep: Sweep, tid: str) -> tuple[str, Any, str | None]:
    """(status, metric value, params_sha256 of the metric's stage) from a trial's manifest."""
    path = sweep.trial_dir(tid) / "manifest.json"
    if not path.exists():
        return "pending", None, None
    stages = json.loads(path.read_text())["stages"]
    entry = stages.get(sweep.spec.metric_stage, {})
    statuses = {e.get("status", "pending") for e in stages.values()}
    status = next(s for s in ("failed", "running", "pending", "done") if s in statuses)
    return (
        status,
        (entry.get("metrics") or {}).get(sweep.spec.metric_key),
        entry.get("params_sha256"),
    )


def write_summary(sweep: Sweep, trials: list[tuple[str, dict]], *, extra: dict | None = None):
    """summary.md + summary.csv (finished trials sorted by the metric, best first, then the
    rest) and sweep_<param>.png (metric vs each swept key)."""
    from train.pipeline import atomic_write
    from train.report import format_table

    keys = list(sweep.spec.params)
    rows = []
    for tid, params in trials:
        status, value, sha = metric_of(sweep, tid)
        status = (extra or {}).get(tid, status)
        rows.append(
            {
                "trial": tid,
                "status": status,
                **params,
                sweep.spec.metric_key: value,
                "params_sha256": sha,
            }
        )
    sign = 1 if sweep.spec.goal == "minimize" else -1
    rows.sort(
        key=lambda r: (
            r[sweep.spec.metric_key] is None,
            sign * (r[sweep.spec.metric_key] or 0.0),
            r["trial"],
        )
    )
    header = ["trial", "status", *keys, sweep.spec.metric_key, "params_sha256"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow(["" if r[h] is None else r[h] for h in header])
    atomic_write(sweep.dir / "summary.csv", buf.getvalue())
    table = format_table(
        [[_fmt(r[h]) if r[h] is not None else "" for h in header[:-1]] for r in rows], header[:-1]
    )
    done = [r for r in rows if r[sweep.spec.metric_key] is not None]
    text = (
        f"# Sweep {sweep.name}\n\n{sweep.spec.method}, {len(done)} of {len(rows)} trials "
        f"with {sweep.spec.metric} ({sweep.spec.goal}), best first\n\n{table}\n"
    )
    if done:
        for key in keys:
            png = _plot(sweep, key, done)
            text += f"\n![{key}]({png.name})\n"
    atomic_write(sweep.dir / "summary.md", text)
    return text


def _plot(sweep: Sweep, key: str, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[key] for r in rows]
    ys = [r[sweep.spec.metric_key] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    ax.scatter(xs if numeric else [str(x) for x in xs], ys)
    if numeric and (
        _range_kind(sweep.spec.params[key]) == "loguniform"
        or (min(xs) > 0 and max(xs) / min(xs) >= 10)
    ):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(sweep.spec.metric_key)
    ax.set_title(f"{sweep.name}: {sweep.spec.metric_key} vs {key.rsplit('.', 1)[-1]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = sweep.dir / f"sweep_{key}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_sweep(
    raw: dict,
    *,
    source: str,
    overrides: list[str] = (),
    trial: str | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    log=print,
    num_devices: int | None = None,
) -> int:
    """Run (or with `dry_run` describe) the sweep in `raw` (a pipeline YAML tree with `sweep:`);
    returns the process exit status. ConfigError for a bad sweep or any bad trial config.
    `overrides` (dotted.key=value) apply to the base config, before the trials' params."""
    raw = with_base(raw, source=source)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text=text)
    sweep = Sweep(raw, source=source, num_devices=num_devices)
    if not dry_run:
        os.environ["DISTILLAX_WANDB_GROUP"] = sweep.name  # wandb groups the trials of a sweep
    if sweep.spec.method == "optuna":
        return _run_optuna(sweep, trial=trial, fresh=fresh, dry_run=dry_run, log=log)

    expanded = expand_grid(sweep.spec) if sweep.spec.method == "grid" else expand_random(sweep.spec)
    trials = [(trial_id(i), p) for i, p in enumerate(expanded)]
    errors, configs = [], []
    for tid, params in trials:  # every trial validated before the first one starts
        try:
            configs.append(sweep.trial_config(tid, params))
        except ConfigError as e:
            errors += e.messages
    if errors:
        raise ConfigError(errors)
    shared_names = sweep.shared_stages(configs)
    shared = sweep.shared_config(shared_names, trials[0][1])
    if dry_run:
        log(_describe(sweep, trials, configs, shared_names))
        return 0
    if fresh and trial is None and sweep.dir.exists():  # only once every trial is valid
        shutil.rmtree(sweep.dir)
    if trial is not None:
        ids = [t for t, _ in trials]
        if trial not in ids:
            raise ConfigError(
                [f"{source}: --trial {trial}: no such trial; valid: {', '.join(ids)}"]
            )
        trials_to_run = [(c, p) for c, (t, p) in zip(configs, trials, strict=True) if t == trial]
    else:
        trials_to_run = [(c, p) for c, (_, p) in zip(configs, trials, strict=True)]
    if not run_shared(shared, fresh=False, log=log):
        log("shared stages interrupted; run the same command again to resume")
        return 0
    for cfg, params in trials_to_run:
        status = run_trial(cfg, shared, params, fresh=fresh and trial is not None, log=log)
        if status == "skipped":
            log(f"=== trial {cfg.run.name}: done, skipped")
        write_summary(sweep, trials)
        if status == "interrupted":
            log(f"trial {cfg.run.name} interrupted; run the same command again to resume")
            return 0
    log(write_summary(sweep, trials))
    return 0


def _describe(sweep: Sweep, trials, configs, shared_names) -> str:
    from train.report import format_table

    rows = [
        [tid, "ok", _fmt_params(p), str(c.run_dir)]
        for (tid, p), c in zip(trials, configs, strict=True)
    ]
    return (
        f"sweep {sweep.name} ({sweep.spec.method}, {len(trials)} trials, metric "
        f"{sweep.spec.metric}, {sweep.spec.goal}) in {sweep.dir}\n"
        f"shared stages (run once in {sweep.dir / 'shared'}): "
        f"{', '.join(shared_names) or '(none)'}\n"
        + format_table(rows, ["trial", "config", "params", "run directory"])
    )


# ---------------------------------------------------------------------------------------------
# optuna


def _optuna_corners(sweep: Sweep) -> list[PipelineConfig]:
    """The base config with every swept key at its low end, and at its high end: validated
    before any trial runs, and compared to find the stages no swept key reaches."""
    lo, hi = _corner_params(sweep)
    return [sweep.trial_config("lo", lo), sweep.trial_config("hi", hi)]


def _corner_params(sweep: Sweep) -> tuple[dict, dict]:
    lo = {k: _extremes(s)[0] for k, s in sweep.spec.params.items()}
    hi = {k: _extremes(s)[1] for k, s in sweep.spec.params.items()}
    return lo, hi


def _run_optuna(sweep: Sweep, *, trial: str | None, fresh: bool, dry_run: bool, log) -> int:
    import optuna
    from optuna.trial import TrialState

    spec = sweep.spec
    if trial is not None:
        raise ConfigError(
            [
                f"{sweep.source}: --trial: not for optuna sweeps; run the plain command in each "
                "worker instead (they share the study through its storage)"
            ]
        )
    corners = _optuna_corners(sweep)
    shared_names = sweep.shared_stages(corners)
    shared = sweep.shared_config(shared_names, _corner_params(sweep)[0])
    storage = spec.storage or f"sqlite:///{sweep.dir.absolute()}/optuna.db"
    if dry_run:
        log(
            f"sweep {sweep.name} (optuna, {spec.trials} trials, metric {spec.metric}, "
            f"{spec.goal}) in {sweep.dir}; storage {storage}\n"
            f"shared stages (run once in {sweep.dir / 'shared'}): "
            f"{', '.join(shared_names) or '(none)'}\n"
            "the base config with every swept key at its low and at its high end: valid"
        )
        return 0
    if fresh and sweep.dir.exists():
        shutil.rmtree(sweep.dir)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2)
        if spec.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study_args = dict(
        study_name=sweep.name, storage=storage, load_if_exists=True, direction=spec.goal
    )
    # a resumed (or a second) worker must not replay the first one's random draws: offset the
    # sampler's seed by the trials the study already holds
    known = len(optuna.create_study(**study_args).get_trials(deepcopy=False))
    study = optuna.create_study(
        **study_args, sampler=optuna.samplers.TPESampler(seed=spec.seed + known), pruner=pruner
    )
    if not run_shared(shared, fresh=False, log=log):
        log("shared stages interrupted; run the same command again to resume")
        return 0

    def listing():
        return [
            (trial_id(t.number), t.params) for t in study.get_trials(deepcopy=False) if t.params
        ]

    def pruned_states():
        return {
            trial_id(t.number): t.state.name.lower()
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.PRUNED, TrialState.FAIL)
        }

    def run_one(t, params) -> str:
        tid = trial_id(t.number)
        try:
            cfg = sweep.trial_config(tid, params)
        except ConfigError:
            study.tell(t.number, state=TrialState.FAIL)
            raise
        with _pruning(
            study, t, spec, last_step=getattr(cfg.stages[spec.metric_stage], "steps", None)
        ) as pruned:
            try:
                status = run_trial(cfg, shared, params, fresh=False, log=log)
            except Exception:
                if not pruned:
                    study.tell(t.number, state=TrialState.FAIL)
                    raise
                status = "pruned"
        if status == "pruned":
            log(f"=== trial {tid}: pruned")
            study.tell(t.number, state=TrialState.PRUNED)
        elif status in ("done", "skipped"):
            study.tell(t.number, metric_of(sweep, tid)[1])
        write_summary(sweep, listing(), extra=pruned_states())
        return status

    # trials a killed worker left RUNNING: the same params, in the same directory
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = trial_id(t.number)
        if not sweep.trial_dir(tid).exists() or set(t.params) != set(spec.params):
            continue
        status = run_one(t, dict(t.params))
        if status == "interrupted":
            log(f"trial {tid} interrupted; run the same command again to resume")
            return 0
    while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < spec.trials:
        t = study.ask()
        params = suggest(t, spec)
        sweep.trial_dir(trial_id(t.number)).mkdir(parents=True, exist_ok=True)
        status = run_one(t, params)
        if status == "interrupted":
            log(f"trial {trial_id(t.number)} interrupted; run the same command again to resume")
            return 0
    log(write_summary(sweep, listing(), extra=pruned_states()))
    return 0


@contextlib.contextmanager
def _pruning(study, t, spec: SweepConfig, *, last_step: int | None):
    """While a trial runs, report each held-out evaluation of the metric's stage to optuna and
    stop the trial (by raising optuna.TrialPruned out of the logger) when the pruner says so.
    Yields a list that is non-empty once the trial was pruned."""
    from train import metrics

    pruned: list[int] = []
    if spec.pruner == "none":
        yield pruned
        return
    import optuna

    trial = optuna.Trial(study, t._trial_id)  # t: a Trial from ask() or a RUNNING FrozenTrial

    def hook(stage: str, step: int, values: dict) -> None:
        value = values.get(spec.metric_key)
        if stage != spec.metric_stage or value is None or step >= (last_step or 0):
            return
        trial.report(float(value), step)
        if trial.should_prune():
            pruned.append(step)
            raise optuna.TrialPruned(f"pruned at step {step}")

    metrics.EVAL_HOOKS.append(hook)
    try:
        yield pruned
    finally:
        metrics.EVAL_HOOKS.remove(hook)
