"""The pipeline config: YAML in, a validated, fully resolved `PipelineConfig` out.

    cfg = load_config("configs/quickstart.yaml", ["stages.student.steps=200"])

Everything a run needs is checked here, before any compute: unknown keys (with a "did you
mean"), wrong types, unknown stage kinds, references to unknown models or stages, dependency
cycles, a mesh that does not fit the devices, a batch that does not split over the data-parallel
devices. Every problem becomes one line of a `ConfigError` that names the file and the dotted key
and says what would be valid; `launch.py` prints them and exits with status 2.

One small pydantic model per concern (run, tokenizer, data, optim, eval; mesh, logging and
checkpoint live next to their implementations); each stage kind declares its own config class in
`recipes/<kind>.py`, found through `recipes.stage_config_class`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import graphlib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.checkpoint import CheckpointConfig
from train.distributed import DistributedConfig
from train.mesh import MeshConfig, MeshError, resolve_mesh_shape
from train.metrics import LoggingConfig
from train.models.config import ModelConfig

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """One or more problems with a config, each a line naming the file and key."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Strict):
    name: str = "run"
    """Run directory name under `dir`; the same name resumes the same run."""
    dir: str = "runs"
    seed: int = 0
    """Seed of everything random: init, data order, sampling."""


class TokenizerConfig(Strict):
    kind: Literal["bpe", "hf", "sentencepiece"] = "bpe"
    """bpe: trained on `train_on` at first use and cached in the run dir; hf / sentencepiece:
    load `path` (tokenizer.json / tokenizer.model)."""
    vocab_size: int = Field(4096, gt=16)
    """BPE vocabulary size (also the models' vocab_size unless a model sets its own)."""
    train_on: str | dict[str, Any] = "kjv"
    path: str | None = None


class InitConfig(Strict):
    """Where a model's weights come from; nothing set means random init."""

    stage: str | None = None
    """the final checkpoint of this stage of the pipeline"""
    hf: str | None = None
    """a Hugging Face checkpoint directory"""
    checkpoint: str | None = None
    """a distillax final checkpoint directory (`<stage>/final`)"""


class DataConfig(Strict):
    corpus: str | dict[str, Any] = "kjv"
    """`kjv` (shipped), {text: path}, {jsonl: path, field: text} or {array_record: path}"""
    seq_len: int = Field(256, gt=1)
    batch_size: int = Field(16, gt=0)
    """global batch size in sequences (all processes, all micro-batches)"""
    heldout_fraction: float = Field(0.02, gt=0, lt=1)
    max_rows: int | None = Field(None, gt=0)
    """use only the first N packed training rows (a token budget stages can share)"""


class ChatDataConfig(Strict):
    """Batches of chat sequences (post-training stages)."""

    seq_len: int = Field(64, gt=1)
    batch_size: int = Field(32, gt=0)


class TaskConfig(Strict):
    """Prompts (and reference answers) from a registered task in `data/tasks.py`."""

    name: str = "arithmetic"
    """arithmetic, chain_sum, code or jsonl"""
    options: dict[str, Any] = {}
    """the task's own options, e.g. {max_value: 20, ops: "+"} or {path: data.jsonl}"""
    train_size: int = Field(2000, gt=0)
    test_size: int = Field(100, gt=0)
    """held-out prompts for accuracy (disjoint from train)"""

    @model_validator(mode="after")
    def _known(self):
        from data.tasks import check_task

        errors = check_task(self.name, dict(self.options))
        if errors:
            raise ValueError("; ".join(errors))
        return self


class RolloutConfig(Strict):
    """How the policy samples responses (train/sampler.py, with a KV cache)."""

    prompts_per_step: int = Field(16, gt=0)
    samples_per_prompt: int = Field(8, gt=0)
    """a group per prompt: GRPO and RLOO compare a prompt's samples with each other"""
    max_new_tokens: int = Field(16, gt=0)
    max_prompt_len: int = Field(48, gt=0)
    """prompts are padded to this width (one compiled program); a longer prompt is an error"""
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)


class OptimConfig(Strict):
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """final learning rate as a fraction of lr (cosine and linear)"""
    weight_decay: float = Field(0.1, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_norm: float | None = Field(1.0, gt=0)
    """global gradient-norm clipping; null disables it"""
    grad_accum: int = Field(1, ge=1)
    """micro-batches per optimizer step (batch_size is split into this many)"""


class EvalConfig(Strict):
    every: int = Field(200, ge=0)
    """steps between evaluations (0: only at the end)"""
    batches: int = Field(8, ge=1)
    """held-out batches per evaluation (fewer if the held-out set is smaller)"""


class DistillLossConfig(Strict):
    """The distillation loss (`train/losses.py`), mixed with hard-label CE by alpha."""

    kind: Literal["sampled_ce", "topk_kl", "full_kl"] = "sampled_ce"
    """sampled_ce: Gemma 3 (CE on the teacher restricted to sampled ids, renormalised);
    topk_kl: KL on the teacher's top-k; full_kl: divergence on the full distribution"""
    alpha: float = Field(1.0, ge=0, le=1)
    """weight of the distillation term; 1 - alpha goes to next-token CE on the data"""
    temperature: float = Field(1.0, gt=0)
    """softens both distributions; the loss is multiplied by T^2"""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """full_kl only: KL(teacher||student), KL(student||teacher) or generalised JSD(beta)"""
    beta: float = Field(0.5, ge=0, le=1)
    renormalize: Literal["both", "teacher_only"] = "both"
    """topk_kl only: renormalise both over the top-k (MaxText), or keep the teacher's missing
    mass as one extra bin against the student's mass outside the top-k (DistillKit)"""
    weights: Literal["probs", "counts"] = "probs"
    """sampled_ce only: target weights from teacher probabilities or from draw counts"""


class StageConfig(Strict):
    """Fields every stage kind has. A stage kind subclasses this in recipes/<kind>.py."""

    kind: str
    after: list[str] = []
    """extra stages that must finish first (artifact references add their own)"""

    def references(self) -> dict[str, str]:
        """{dotted field: stage name} of the artifacts this stage reads."""
        return {}

    def model_names(self) -> list[str]:
        """Names under `models:` this stage uses."""
        return []

    def check(
        self, *, name: str, stages: dict[str, StageConfig], models: dict[str, ModelConfig]
    ) -> list[str]:
        """Problems that need the other stages (or the models) to see, as "key: message"."""
        return []

    def batch_rows(self) -> tuple[str, int] | None:
        """(the key that sets it, rows of one training batch), which must split evenly over
        the data-parallel devices; None for a stage without training batches."""
        data = getattr(self, "data", None)
        return None if data is None else ("data.batch_size", data.batch_size)


class TrainStageConfig(StageConfig):
    """What every training stage shares: model, data, optimizer, eval, checkpoints."""

    model: str
    init: InitConfig = InitConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = Field(1000, gt=0)
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    nan_policy: Literal["stop", "skip"] = "stop"
    """on a non-finite loss or gradient: stop with a message, or skip that update"""

    def references(self) -> dict[str, str]:
        return {"init.stage": self.init.stage} if self.init.stage else {}

    def model_names(self) -> list[str]:
        return [self.model]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A validated pipeline: every default filled in, model presets resolved."""

    source: str
    run: RunConfig
    mesh: MeshConfig
    logging: LoggingConfig
    tokenizer: TokenizerConfig
    models: dict[str, ModelConfig]
    stages: dict[str, StageConfig]
    order: tuple[str, ...]  # dependency order

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict:
        return {
            "run": self.run.model_dump(),
            "mesh": self.mesh.model_dump(),
            "logging": self.logging.model_dump(),
            "tokenizer": self.tokenizer.model_dump(),
            "models": {k: v.model_dump() for k, v in self.models.items()},
            "stages": {k: v.model_dump() for k, v in self.stages.items()},
        }

    def dependencies(self, stage: str) -> list[str]:
        st = self.stages[stage]
        return list(dict.fromkeys([*st.after, *st.references().values()]))

    def stage_model(self, stage: str) -> ModelConfig:
        """The model config of a training stage (a stage that other stages read weights from)."""
        return self.models[self.stages[stage].model]

    def stage_hash(self, stage: str) -> str:
        """What a stage's result depends on: its config, its models, the tokenizer, the seed,
        and the hashes of the stages it reads. Mesh and logging are not part of it."""
        st = self.stages[stage]
        payload = {
            "stage": st.model_dump(),
            "models": {m: self.models[m].model_dump() for m in st.model_names()},
            "tokenizer": self.tokenizer.model_dump(),
            "seed": self.run.seed,
            "upstream": {d: self.stage_hash(d) for d in self.dependencies(stage)},
        }
        for m in payload["models"].values():  # execution details that do not change results
            for k in ("scan_layers", "remat"):
                m.pop(k)
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# YAML and overrides


DELETE = object()  # the value of a `~dotted.key` override: remove that key


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (['a', 'b', 0, 'c'], value parsed as a YAML scalar);
    `~a.b` -> (['a', 'b'], DELETE): drop a key, e.g. `~stages.rl` to leave a stage out."""
    if text.startswith("~") and "=" not in text:
        key, value = text[1:], None
    elif "=" not in text:
        raise ConfigError([f"override {text!r}: expected dotted.key=value or ~dotted.key"])
    else:
        key, value = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key part in {key!r}"])
    keys = [int(p) if p.isdigit() else p for p in key.split(".")]
    if value is None:
        return keys, DELETE
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override {text!r}: value is not valid YAML ({e})"]) from None
    return keys, parsed


def apply_override(tree: dict, path: list[str | int], value: Any, *, text: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        where = ".".join(map(str, path[: i + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError([f"override {text!r}: {where} is not an index of the list"])
            node = node[part]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError([f"override {text!r}: {where} is a value, not a mapping"])
        if not isinstance(node, dict | list):
            raise ConfigError([f"override {text!r}: {where} is a value, not a mapping"])
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError([f"override {text!r}: {last} is not an index of the list"])
    if value is DELETE:
        if last not in node:
            raise ConfigError([f"override {text!r}: there is no {'.'.join(map(str, path))}"])
        del node[last]
        return
    node[last] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {type(data).__name__}"])
    return data


# ---------------------------------------------------------------------------------------------
# validation


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic model classes inside a type annotation (Optional, unions, containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def _valid_keys_at(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the model that holds the key at `loc` (for 'did you mean')."""
    for part in loc[:-1]:
        if isinstance(part, str) and part in cls.model_fields:
            models = _models_in(cls.model_fields[part].annotation)
            if not models:
                return None
            cls = models[0]
    return list(cls.model_fields)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def _format_errors(e: ValidationError, cls: type[BaseModel], *, prefix: str, source: str):
    lines = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function")))
        key = ".".join(str(p) for p in (prefix, *loc) if p != "")
        if err["type"] == "extra_forbidden":
            valid = _valid_keys_at(cls, loc) or []
            lines.append(f"{source}: {key}: unknown key{_suggest(loc[-1], valid)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {err['msg']}{shown}")
    return lines


def _validate(cls, data, *, prefix: str, source: str, errors: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{source}: {prefix}: expected a mapping, got {type(data).__name__}")
        return None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors.extend(_format_errors(e, cls, prefix=prefix, source=source))
        return None


TOP_LEVEL = ("run", "mesh", "logging", "tokenizer", "models", "stages", "distributed")


def _resolve_model(spec, *, name: str, tokenizer: TokenizerConfig | None, source: str, errors):
    from train.models.presets import PRESETS, get_preset

    prefix = f"models.{name}"
    if not isinstance(spec, dict):
        errors.append(f"{source}: {prefix}: expected a mapping with a preset and/or fields")
        return None
    spec = dict(spec)
    preset = spec.pop("preset", None)
    valid = ["preset", *ModelConfig.model_fields]
    bad = [k for k in spec if k not in ModelConfig.model_fields]
    for k in bad:
        errors.append(f"{source}: {prefix}.{k}: unknown key{_suggest(k, valid)}")
    if bad:
        return None
    fields = {}
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(
                f"{source}: {prefix}.preset: unknown preset {preset!r}{hint}; "
                f"valid: {', '.join(sorted(PRESETS))}"
            )
            return None
        fields.update(get_preset(preset).model_dump())
    if tokenizer is not None and tokenizer.kind == "bpe" and "vocab_size" not in spec:
        fields["vocab_size"] = tokenizer.vocab_size  # the model speaks the run's tokenizer
    fields.update(spec)
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as e:
        errors.extend(_format_errors(e, ModelConfig, prefix=prefix, source=source))
        return None


def parse_config(raw: dict, *, source: str = "<config>", num_devices: int | None = None):
    """Validate a raw config tree (YAML + overrides applied) into a PipelineConfig."""
    from recipes import STAGE_KINDS, stage_config_class

    errors: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            errors.append(f"{source}: {key}: unknown key{_suggest(key, list(TOP_LEVEL))}")
    v = lambda cls, key: _validate(cls, raw.get(key), prefix=key, source=source, errors=errors)
    run, mesh, logging, tokenizer = (
        v(RunConfig, "run"),
        v(MeshConfig, "mesh"),
        v(LoggingConfig, "logging"),
        v(TokenizerConfig, "tokenizer"),
    )
    # Validated only: launch.py reads it before this (train/distributed.py), to join the job.
    v(DistributedConfig, "distributed")
    if run is not None and not NAME_RE.match(run.name):
        errors.append(f"{source}: run.name: {run.name!r} must be a plain directory name")
    if tokenizer is not None and tokenizer.kind != "bpe" and not tokenizer.path:
        errors.append(f"{source}: tokenizer.path: required for kind {tokenizer.kind!r}")

    models: dict[str, ModelConfig] = {}
    raw_models = raw.get("models") or {}
    if not isinstance(raw_models, dict):
        errors.append(f"{source}: models: expected a mapping of model name -> spec")
        raw_models = {}
    for name, spec in raw_models.items():
        m = _resolve_model(spec, name=name, tokenizer=tokenizer, source=source, errors=errors)
        if m is not None:
            models[name] = m

    stages: dict[str, StageConfig] = {}
    raw_stages = raw.get("stages") or {}
    if not isinstance(raw_stages, dict) or not raw_stages:
        errors.append(f"{source}: stages: expected a non-empty mapping of stage name -> config")
        raw_stages = {}
    for name, spec in raw_stages.items():
        prefix = f"stages.{name}"
        if not NAME_RE.match(str(name)):
            errors.append(f"{source}: {prefix}: stage names are plain directory names")
            continue
        if not isinstance(spec, dict):
            errors.append(f"{source}: {prefix}: expected a mapping with a kind, got {spec!r}")
            continue
        kind = spec.get("kind")
        if kind not in STAGE_KINDS:
            close = difflib.get_close_matches(str(kind), list(STAGE_KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            what = "missing" if kind is None else f"unknown stage kind {kind!r}{hint}"
            errors.append(f"{source}: {prefix}.kind: {what}; valid: {', '.join(STAGE_KINDS)}")
            continue
        st = _validate(stage_config_class(kind), spec, prefix=prefix, source=source, errors=errors)
        if st is not None:
            stages[name] = st

    # cross references
    for name, st in stages.items():
        for m in st.model_names():
            if m not in models and m not in raw_models:
                valid = ", ".join(models) or "(none defined)"
                errors.append(f"{source}: stages.{name}.model: unknown model {m!r}; valid: {valid}")
        refs = {**{f"after.{i}": a for i, a in enumerate(st.after)}, **st.references()}
        for field, target in refs.items():
            if target == name:
                errors.append(f"{source}: stages.{name}.{field}: a stage cannot depend on itself")
            elif target not in raw_stages:
                close = difflib.get_close_matches(str(target), list(raw_stages), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(
                    f"{source}: stages.{name}.{field}: unknown stage {target!r}{hint}; "
                    f"valid: {', '.join(raw_stages)}"
                )
    if errors:
        raise ConfigError(errors)

    for name, st in stages.items():
        errors += [
            f"{source}: stages.{name}.{m}"
            for m in st.check(name=name, stages=stages, models=models)
        ]
    if errors:
        raise ConfigError(errors)

    cfg = PipelineConfig(
        source=source,
        run=run,
        mesh=mesh,
        logging=logging,
        tokenizer=tokenizer,
        models=models,
        stages=stages,
        order=(),
    )
    sorter = graphlib.TopologicalSorter({s: cfg.dependencies(s) for s in stages})
    try:
        order = tuple(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise ConfigError([f"{source}: stages: dependency cycle {cycle}"]) from None
    # keep the YAML order wherever dependencies allow it
    order = _stable_order(list(stages), cfg)
    cfg = dataclasses.replace(cfg, order=order)
    _check_devices(cfg, num_devices=num_devices, errors=errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def _stable_order(names: list[str], cfg: PipelineConfig) -> tuple[str, ...]:
    done: list[str] = []
    pending = list(names)
    while pending:
        for n in pending:
            if all(d in done for d in cfg.dependencies(n)):
                done.append(n)
                pending.remove(n)
                break
    return tuple(done)


def _check_devices(cfg: PipelineConfig, *, num_devices: int | None, errors: list[str]):
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    try:
        shape = resolve_mesh_shape(cfg.mesh, num_devices=num_devices)
    except MeshError as e:
        errors.append(f"{cfg.source}: {e}")
        return
    dp = shape["data"] * shape["fsdp"]
    for name, st in cfg.stages.items():
        rows = st.batch_rows()
        if rows is None:
            continue
        key, n = rows
        optim = getattr(st, "optim", None)
        accum = optim.grad_accum if optim is not None else 1
        if n % (dp * accum):
            errors.append(
                f"{cfg.source}: stages.{name}.{key}: {n} rows must be a multiple of "
                f"data x fsdp ({dp}) x optim.grad_accum ({accum}) = {dp * accum}"
            )


def load_config(path: str | Path, overrides: list[str] = (), *, num_devices: int | None = None):
    """Read, override and validate a pipeline config file."""
    raw = read_yaml(path)
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text=text)
    return parse_config(raw, source=str(path), num_devices=num_devices)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, types.SimpleNamespace):
        return _plain(vars(x))
    return x
