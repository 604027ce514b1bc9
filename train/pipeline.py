"""The run directory, its manifest, the stage graph and resume.

    runs/<name>/config.yaml      the resolved config
    runs/<name>/manifest.json    per stage: status, config_hash, step, final_checkpoint,
                                 params_sha256, metrics (written atomically)
    runs/<name>/<stage>/...      checkpoints/, final/, metrics.jsonl, stage outputs
    runs/<name>/report.md        summary table at the end

Running the same command again continues the run: `done` stages with an unchanged config hash
are skipped, an interrupted stage resumes from its latest checkpoint. A changed stage config
invalidates that stage and everything downstream; launch refuses to mix old and new results
unless `--fresh` (start the run over) is given.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from train.config import ConfigError, PipelineConfig, dump_yaml
from train.loop import StopFlag
from train.report import format_table, stage_table, write_report


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def is_main_process() -> bool:
    return jax.process_index() == 0


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file in the same directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class StageResult:
    status: str  # "done" or "interrupted"
    step: int
    final_checkpoint: str | None = None
    params_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # other artifacts, e.g. a logit store


class Manifest:
    """manifest.json: the truth about a run. Only process 0 writes it."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def update(self, name: str, **fields) -> None:
        self.stage(name).update(fields)
        self.save()

    def save(self) -> None:
        if is_main_process():
            atomic_write(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")


@dataclass
class StageContext:
    """What a stage gets besides its own config: the run, the mesh, the tokenizer, artifacts."""

    pipeline: PipelineConfig
    name: str
    manifest: Manifest
    stop: StopFlag
    _mesh: Any = None
    _tokenizer: Any = None

    @property
    def run_dir(self) -> Path:
        """Absolute, so that the paths a stage records (final_checkpoint, outputs) still
        resolve when a later command runs from another directory."""
        return self.pipeline.run_dir.absolute()

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def config_hash(self) -> str:
        return self.pipeline.stage_hash(self.name)

    @property
    def seed(self) -> int:
        return self.pipeline.run.seed

    @property
    def mesh(self):
        if self._mesh is None:
            from train.mesh import make_mesh

            self._mesh = make_mesh(self.pipeline.mesh)
        return self._mesh

    @property
    def rules(self) -> dict:
        return self.pipeline.mesh.logical_rules()

    def tokenizer(self):
        if self._tokenizer is None:
            from data.tokenizer import load_tokenizer

            t = self.pipeline.tokenizer
            self._tokenizer = load_tokenizer(
                kind=t.kind,
                vocab_size=t.vocab_size,
                train_on=t.train_on,
                path=t.path,
                cache_dir=str(self.run_dir / "tokenizer"),
            )
        return self._tokenizer

    def model_config(self, name: str):
        return self.pipeline.models[name]

    def artifact(self, stage: str) -> dict:
        """The manifest entry of a finished upstream stage (its final checkpoint, metrics)."""
        entry = self.manifest.stage(stage)
        if entry.get("status") != "done":
            raise RuntimeError(f"stage {self.name!r} needs stage {stage!r}, which is not done")
        return entry

    def trained_params(self, stage: str, *, mesh=None, dtype: str | None = None):
        """(graphdef, params on the mesh, shardings) of a finished training stage's model,
        e.g. a teacher; `dtype` overrides its param/compute dtype (a bf16 teacher).

        A reward model (a reward_model stage, or a merge of them) also has its float32
        `score_head`, replicated: the graphdef is then recipes.reward_model.RewardModel's."""
        from recipes import reward_model
        from train.loop import abstract_params, load_params

        model_cfg = self.pipeline.stage_model(stage)
        if dtype is not None:
            model_cfg = model_cfg.model_copy(update={"param_dtype": dtype, "compute_dtype": dtype})
        if reward_model.is_reward_model(self.pipeline, stage):
            abstract_params = reward_model.abstract_params
        graphdef, abstract, shardings = abstract_params(
            model_cfg, mesh=mesh or self.mesh, rules=self.rules
        )
        params = load_params(self.artifact(stage)["final_checkpoint"], abstract=abstract)
        return graphdef, params, shardings

    def interrupted(self) -> StageResult:
        """The result of a stage that SIGTERM stopped, at its last saved step."""
        return StageResult(status="interrupted", step=self.manifest.stage(self.name).get("step", 0))

    def progress(self, *, step: int) -> None:
        """Record how far the stage got (called at checkpoints)."""
        self.manifest.update(self.name, step=step)

    def logger(self, *, total_steps: int, start_step: int):
        from train.metrics import MetricsLogger

        return MetricsLogger(
            stage_dir=self.stage_dir,
            run_dir=self.run_dir,
            run_name=self.pipeline.run.name,
            stage_name=self.name,
            cfg=self.pipeline.logging,
            config=self.pipeline.to_dict(),
            total_steps=total_steps,
            start_step=start_step,
            group=os.environ.get("DISTILLAX_WANDB_GROUP"),  # set by a sweep: one group per sweep
        )


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class PlanItem:
    stage: str
    kind: str
    action: str  # "run", "resume", "skip", "rerun"
    detail: str = ""


def plan(cfg: PipelineConfig, manifest: Manifest) -> list[PlanItem]:
    """What launching now would do for each stage, in order. Raises ConfigError where the run
    directory holds results of a different config (unless the caller starts fresh)."""
    items, changed = [], []
    invalid: set[str] = set()
    for name in cfg.order:
        st = cfg.stages[name]
        entry = manifest.data["stages"].get(name, {"status": "pending"})
        old_hash, new_hash = entry.get("config_hash"), cfg.stage_hash(name)
        status = entry.get("status", "pending")
        upstream_invalid = any(d in invalid for d in cfg.dependencies(name))
        if status != "pending" and old_hash not in (None, new_hash):
            invalid.add(name)
            changed.append(name)
            items.append(PlanItem(name, st.kind, "rerun", "config changed"))
        elif upstream_invalid:
            invalid.add(name)
            if status != "pending":
                changed.append(name)
            items.append(PlanItem(name, st.kind, "rerun", "upstream changed"))
        elif status == "done":
            items.append(PlanItem(name, st.kind, "skip", f"done at step {entry.get('step')}"))
        elif status in ("running", "failed") and entry.get("step"):
            items.append(PlanItem(name, st.kind, "resume", f"from step {entry['step']}"))
        else:
            items.append(PlanItem(name, st.kind, "run"))
    if changed:
        raise ConfigError(
            [
                f"{cfg.source}: run {cfg.run.name!r} in {cfg.run_dir} holds results of a different "
                f"config for stage(s) {', '.join(changed)}; rerun with --fresh to start the run "
                "over, or set run.name to a new name"
            ]
        )
    return items


def describe_plan(items: list[PlanItem]) -> str:
    rows = [[i.stage, i.kind, i.action, i.detail] for i in items]
    return format_table(rows, ["stage", "kind", "action", "detail"])


# ---------------------------------------------------------------------------------------------
# running


def prepare_run_dir(cfg: PipelineConfig, *, fresh: bool) -> Manifest:
    run_dir = cfg.run_dir
    if fresh and run_dir.exists() and is_main_process():
        shutil.rmtree(run_dir)
    # Several processes: all read the manifest after process 0 removed it (--fresh) and before
    # it writes it again, so that every process plans the same steps.
    sync_processes("distillax_run_dir_ready")
    manifest = Manifest(run_dir / "manifest.json")
    sync_processes("distillax_manifest_read")
    return manifest


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process job; nothing with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_pipeline(cfg: PipelineConfig, *, fresh: bool = False, log=print) -> int:
    """Run every stage in order; returns the process exit status (0 done or interrupted)."""
    from recipes import stage_module

    manifest = prepare_run_dir(cfg, fresh=fresh)
    items = plan(cfg, manifest)
    if is_main_process():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cfg.run_dir / "config.yaml", dump_yaml(cfg.to_dict()))
    manifest.data.setdefault("run", cfg.run.name)
    manifest.data.setdefault("created", now())
    for name in cfg.order:  # record every stage, so the manifest shows the whole plan
        entry = manifest.stage(name)
        entry.setdefault("kind", cfg.stages[name].kind)
        if entry.get("status", "pending") == "pending":
            entry["config_hash"] = cfg.stage_hash(name)
    manifest.save()

    log(describe_plan(items))
    with StopFlag() as stop:
        for item in items:
            if item.action == "skip":
                continue
            name = item.stage
            ctx = StageContext(pipeline=cfg, name=name, manifest=manifest, stop=stop)
            manifest.update(
                name, status="running", config_hash=ctx.config_hash, started=now(), error=None
            )
            log(f"== stage {name} ({item.kind}): {item.action} {item.detail}".rstrip())
            try:
                result: StageResult = stage_module(item.kind).run(cfg.stages[name], ctx)
            except BaseException as e:
                manifest.update(name, status="failed", error=f"{type(e).__name__}: {e}")
                if is_main_process():
                    (ctx.stage_dir).mkdir(parents=True, exist_ok=True)
                    (ctx.stage_dir / "error.txt").write_text(traceback.format_exc())
                raise
            if result.status == "interrupted":
                manifest.update(name, step=result.step)
                log(
                    f"stopped by signal in stage {name} at step {result.step}; a checkpoint is "
                    "saved. Run the same command again to resume."
                )
                return 0
            manifest.update(
                name,
                status="done",
                step=result.step,
                final_checkpoint=result.final_checkpoint,
                params_sha256=result.params_sha256,
                metrics=result.metrics,
                outputs=result.outputs,
                finished=now(),
            )
    kinds = {n: st.kind for n, st in cfg.stages.items()}
    if is_main_process():
        report = write_report(
            run_dir=cfg.run_dir,
            run_name=cfg.run.name,
            order=cfg.order,
            kinds=kinds,
            manifest=manifest.data,
            extra=comparisons(cfg, manifest.data),
        )
        atomic_write(cfg.run_dir / "report.md", report)
    log(stage_table(cfg.order, kinds, manifest.data))
    return 0


def best_eval_ppl(stage_dir: Path) -> tuple[int, float]:
    """(step, ppl) of the lowest held-out perplexity a stage logged: a baseline that overfits
    is then compared at its best too, not only at its end."""
    from train.metrics import read_metrics

    evals = [r for r in read_metrics(stage_dir / "metrics.jsonl") if "eval_ppl" in r]
    best = min(evals, key=lambda r: r["eval_ppl"])
    return best["step"], best["eval_ppl"]


def comparisons(cfg: PipelineConfig, manifest: dict) -> str:
    """Lines comparing stages that trained the same model on the same data (distilled vs
    from scratch): the question the Gemma 2 ablation asks."""
    lines = []
    done = {n: e for n, e in manifest["stages"].items() if e.get("status") == "done"}
    for a, sa in cfg.stages.items():
        for b, sb in cfg.stages.items():
            if (sa.kind, sb.kind) != ("distill", "pretrain") or a not in done or b not in done:
                continue
            if sa.model != sb.model or sa.data != sb.data or sa.steps != sb.steps:
                continue
            pa, pb = done[a]["metrics"].get("eval_ppl"), done[b]["metrics"].get("eval_ppl")
            if pa and pb:
                verdict = "lower" if pa < pb else "not lower"
                # a sweep's trial records where a shared stage ran (`stage_dir`)
                sdir = lambda n: Path(done[n].get("stage_dir") or cfg.run_dir / n)
                (step_a, ba), (step_b, bb) = best_eval_ppl(sdir(a)), best_eval_ppl(sdir(b))
                lines.append(
                    f"- distilled `{a}` eval ppl {pa:.3f} vs from-scratch `{b}` {pb:.3f} on the "
                    f"same model, data and steps: {verdict} ({(pb - pa) / pb:+.1%}); best "
                    f"during training: {ba:.3f} (step {step_a}) vs {bb:.3f} (step {step_b})"
                )
    return "\n".join(lines)
