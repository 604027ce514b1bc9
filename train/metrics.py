"""One logger per stage: a JSONL file (always), wandb, and a console progress bar.

`<stage>/metrics.jsonl` is the record of a run that reports and tests read: one JSON object per
logged step, appended and flushed line by line so that a SIGKILL loses at most the line being
written. When a stage resumes from checkpoint step S, lines with step > S (written after that
checkpoint by the killed run) are dropped, so a resumed run's file equals an uninterrupted run's
apart from the "time" fields. Only process 0 writes anything.

Usage (inside a recipe):
    logger = MetricsLogger(stage_dir=ctx.stage_dir, run_dir=ctx.run_dir, run_name="quickstart",
                           stage_name="student", cfg=cfg.logging, config=cfg.model_dump(),
                           total_steps=1500, start_step=restored_step)
    throughput = Throughput()
    for step in range(restored_step + 1, 1501):
        state, m = train_step(state, batch)
        throughput.tick(tokens=batch_tokens)
        if step % cfg.logging.every == 0:
            m = {k: float(v) for k, v in m.items()}
            if check_finite(step, m, policy="stop"):
                logger.log(step, {**m, **throughput.rates()})
        else:
            logger.advance(step)
    logger.close()

The environment variable WANDB_MODE, when set, overrides `logging.wandb` (tests set it to
"disabled"), so nothing has to edit a YAML file to silence wandb.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import pydantic
import tqdm

log = logging.getLogger(__name__)

# Shown in the progress bar / console line when present, in this order.
_CONSOLE_KEYS = ("loss", "eval_loss", "kl_to_teacher", "reward_mean", "grad_norm", "lr",
                 "tokens_per_s")  # fmt: skip


class LoggingConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """offline writes under the run dir and never contacts a server (`wandb sync` uploads later)."""
    every: int = pydantic.Field(20, ge=1)
    """Steps between logged train metrics; each log syncs the host, so not every step."""
    project: str = "distillax"
    """wandb project name."""
    progress: bool = True
    """Console progress bar (a TTY) or one compact line per logged step (CI logs)."""


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))  # None: already mapped from nan by _plain


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became nan/inf; training on would only spread the damage."""


def check_finite(step: int, metrics: dict[str, Any], *, policy: Literal["stop", "skip"]) -> bool:
    """Return True when loss and grad_norm (those present) are finite.

    "stop" raises `NonFiniteError`; "skip" warns and returns False: the caller drops the update.
    """
    bad = [
        f"{k}={metrics[k]}"
        for k in ("loss", "grad_norm")
        if k in metrics and not _finite(metrics[k])
    ]
    if not bad:
        return True
    what = f"non-finite {', '.join(bad)} at step {step}"
    if policy == "stop":
        raise NonFiniteError(
            f"{what}. Try a lower learning rate (optim.lr) or a longer warmup, enable gradient "
            "clipping, or compute in float32 instead of bfloat16; or set the NaN policy to 'skip' "
            "to discard such updates."
        )
    log.warning("%s: skipping this update", what)
    return False


class Throughput:
    """Steps/s and tokens/s between calls to `rates()`.

    The first `tick()` only starts the clock: that step includes compilation, which would
    otherwise dominate the first interval. Time spent under `paused()` (eval, checkpoint) is
    excluded. Under async dispatch a tick marks dispatch, not completion; the host syncs when
    metrics are fetched at log time, so intervals of several steps are accurate.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._start: float | None = None
        self._steps = 0
        self._tokens = 0
        self._excluded = 0.0

    def tick(self, tokens: int = 0) -> None:
        """Count one finished training step that processed `tokens` tokens."""
        if self._start is None:
            self._start, self._excluded = self._clock(), 0.0
            return
        self._steps += 1
        self._tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self._excluded += self._clock() - t0

    def rates(self) -> dict[str, float]:
        """{"steps_per_s", "tokens_per_s"} since the last call; {} before any measured step."""
        if self._start is None:
            return {}
        now = self._clock()
        dt = now - self._start - self._excluded
        out = {}
        if self._steps and dt > 0:
            out = {"steps_per_s": self._steps / dt, "tokens_per_s": self._tokens / dt}
        self._start, self._steps, self._tokens, self._excluded = now, 0, 0, 0.0
        return out


def _parse_lines(text: str, path: Path) -> list[dict]:
    """Parse JSONL; a last line without newline or unparsable was cut by a kill and is dropped."""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail is "" when the file ends with a newline
    if tail:
        log.warning("%s: dropping truncated last line %r", path, tail[:80])
    out = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(complete) - 1 and not tail:
                log.warning("%s: dropping unparsable last line %r", path, line[:80])
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return out


EVAL_HOOKS: list[Callable[[str, int, dict], None]] = []
"""Called as hook(stage_name, step, metrics) after each logged eval (a sweep's pruner)."""


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl, in order (a truncated last line is ignored)."""
    path = Path(path)
    return _parse_lines(path.read_text(), path) if path.exists() else []


def _plain(v: Any) -> Any:
    """JSON-safe scalar: arrays -> Python numbers, nan/inf -> null (strict JSON, readable by jq)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Writes a stage's metrics to `<stage_dir>/metrics.jsonl`, wandb and the console."""

    def __init__(
        self,
        *,
        stage_dir: Path,
        run_dir: Path,
        run_name: str,
        stage_name: str,
        cfg: LoggingConfig,
        config: dict,
        total_steps: int,
        start_step: int = 0,
        group: str | None = None,
    ):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.cfg = cfg
        self.active = jax.process_index() == 0
        self._wandb_mode = os.environ.get("WANDB_MODE") or cfg.wandb
        self._wandb_kwargs = dict(
            project=cfg.project,
            dir=str(run_dir),
            # Deterministic id: a resumed stage continues the same wandb run.
            id=hashlib.sha256(f"{run_name}/{stage_name}".encode()).hexdigest()[:16],
            resume="allow",
            name=f"{run_name}/{stage_name}",
            group=group,
            config=config,
        )
        self._wandb_run = None
        self._name = stage_name
        self._total = total_steps
        self._file = self._bar = None
        self._step = start_step
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        # disable=None: tqdm turns itself off when stderr is not a TTY; we then print lines.
        self._bar = tqdm.tqdm(
            total=total_steps, initial=start_step, desc=stage_name, mininterval=1.0,
            disable=None if cfg.progress else True, dynamic_ncols=True,
        )  # fmt: skip

    def _truncate_after(self, start_step: int) -> None:
        """Keep only records the checkpoint at `start_step` has seen; 0 means a fresh start.

        Lines at step == start_step stay: the loop logs a step before checkpointing it. Rewritten
        via temp file + rename so a kill during the rewrite leaves the old file intact.
        """
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if start_step > 0 and r["step"] <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _wandb(self):
        """The wandb run, created on first use so that `disabled` never imports wandb."""
        if self._wandb_mode == "disabled":
            return None
        if self._wandb_run is None:
            import wandb

            Path(self._wandb_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(mode=self._wandb_mode, **self._wandb_kwargs)
        return self._wandb_run

    def _write(self, record: dict) -> None:
        # One write call per line, flushed: after a SIGKILL the OS still has every finished line.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, step: int, metrics: dict[str, float | int | str], *, kind: str = "train") -> None:
        """Record `metrics` at `step`; `kind` ("train", "eval", ...) prefixes the wandb keys."""
        if not self.active:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        self._write({"step": step, "kind": kind, **metrics, "time": time.time()})
        for hook in EVAL_HOOKS if kind == "eval" else ():
            hook(self._name, step, metrics)
        if run := self._wandb():
            run.log({f"{kind}/{k}": v for k, v in metrics.items() if v is not None}, step=step)
        shown = {k: metrics[k] for k in _CONSOLE_KEYS if isinstance(metrics.get(k), int | float)}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self.advance(step)
        if self._bar.disable:
            if self.cfg.progress:
                print(f"[{self._name}] {kind} step {step}/{self._total} {text}", file=sys.stderr)
        else:
            self._bar.set_postfix_str(text, refresh=False)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` without logging (cheap; call every step)."""
        if self.active and step > self._step:
            self._bar.update(step - self._step)
            self._step = step

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence], step: int):
        """Sample texts and the like: a JSONL line of kind "table" and a wandb.Table."""
        if not self.active:
            return
        rows = [[_plain(v) for v in row] for row in rows]
        self._write({"step": step, "kind": "table", "name": name, "columns": list(columns),
                     "rows": rows, "time": time.time()})  # fmt: skip
        if run := self._wandb():
            import wandb

            run.log({name: wandb.Table(columns=list(columns), data=rows)}, step=step)

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
