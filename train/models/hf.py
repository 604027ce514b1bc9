"""Import from and export to Hugging Face checkpoints (config.json + safetensors).

    model = load_hf("path/to/gemma-3-1b-pt")        # Gemma, Gemma2, Gemma3 (text), RecurrentGemma
    logits = model(tokens)                           # int32 [batch, seq] -> float32 logits
    save_hf(model, "out_dir")                        # transformers.AutoModelForCausalLM loads it

transformers is not needed at run time: config.json is read as JSON (both the 5.x
`rope_parameters` form and the legacy `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys)
and tensors come from safetensors (one file or a sharded index). Every conversion is a
transpose/reshape; the RoPE conventions match, so no row permutation is needed
(`../shared/design/gemma.md`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from train.models.config import LayerKind, ModelConfig
from train.models.gemma import Transformer

SUPPORTED = ("gemma", "gemma2", "gemma3_text", "gemma3", "recurrent_gemma")
HF_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}
HF_GRIFFIN_BLOCKS = {"recurrent": "recurrent", "attention": "local"}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint that cannot be read: says which file or tensor and why."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition (truncated) gives `kinds`."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return tuple(kinds[:p])
    return tuple(kinds)


def _rope_theta(params: dict | None, legacy: dict, default: float) -> float:
    if params and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(legacy.get("rope_theta", default))


def _linear_factor(params: dict | None, where: str) -> float:
    if not params:
        return 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise HFFormatError(f"{where}: rope_type {kind!r} is not supported (only default, linear)")


def config_from_hf(hf: dict, *, where: str = "config.json", **overrides) -> ModelConfig:
    """Translate a Hugging Face config dict into a ModelConfig (`overrides` win)."""
    mt = hf.get("model_type")
    if mt == "gemma3":  # the multimodal wrapper: take its language model
        hf = {"model_type": "gemma3_text", **hf.get("text_config", {})}
        mt = "gemma3_text"
    if mt not in SUPPORTED:
        raise HFFormatError(
            f"{where}: model_type {mt!r} is not supported; expected one of {SUPPORTED}"
        )
    if hf.get("tie_word_embeddings") is False:
        raise HFFormatError(f"{where}: untied output embeddings are not a Gemma checkpoint")
    if mt == "recurrent_gemma":
        heads = hf.get("num_attention_heads", 10)
        rp = hf.get("rope_parameters") or {}
        blocks = hf.get("block_types", ["recurrent", "recurrent", "attention"])
        fields = dict(
            family="griffin",
            vocab_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            d_model=hf["hidden_size"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf["hidden_size"] // heads,  # HF derives it; config's head_dim is ignored
            ffw_dim=hf["intermediate_size"] // 2,  # HF's MLP uses intermediate_size // 2
            layer_pattern=tuple(HF_GRIFFIN_BLOCKS[b] for b in blocks),
            sliding_window=hf.get("attention_window_size", 2048),
            final_logit_softcap=hf.get("logits_soft_cap", 30.0),
            rope_base=_rope_theta(rp, hf, 10_000.0),
            rope_local_base=_rope_theta(rp, hf, 10_000.0),
            rope_fraction=rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
            lru_width=hf.get("lru_width") or hf["hidden_size"],
            conv_width=hf.get("conv1d_width", 4),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
        )
        return ModelConfig(**{**fields, **overrides})

    heads = hf["num_attention_heads"]
    common = dict(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffw_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    rp = hf.get("rope_parameters")
    if mt == "gemma":
        fields = dict(family="gemma", rope_base=_rope_theta(rp, hf, 10_000.0))
    else:
        layer_types = hf.get("layer_types")
        if layer_types is None:
            period = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
            layer_types = [
                "sliding_attention" if (i + 1) % period else "full_attention"
                for i in range(common["num_layers"])
            ]
        fields = dict(
            family="gemma2" if mt == "gemma2" else "gemma3",
            layer_pattern=_period([HF_LAYER_TYPES[t] for t in layer_types]),
            sliding_window=hf.get("sliding_window", 4096),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
        if mt == "gemma2":
            fields["rope_base"] = fields["rope_local_base"] = _rope_theta(rp, hf, 10_000.0)
        elif rp and "full_attention" in rp:
            fields["rope_base"] = _rope_theta(rp["full_attention"], {}, 1_000_000.0)
            fields["rope_global_scale"] = _linear_factor(rp["full_attention"], where)
            fields["rope_local_base"] = _rope_theta(rp.get("sliding_attention"), {}, 10_000.0)
        else:
            fields["rope_base"] = _rope_theta(rp, hf, 1_000_000.0)
            fields["rope_global_scale"] = _linear_factor(hf.get("rope_scaling"), where)
            fields["rope_local_base"] = float(hf.get("rope_local_base_freq", 10_000.0))
    return ModelConfig(**{**common, **fields, **overrides})


def _int_if_whole(x: float) -> int | float:
    """transformers types query_pre_attn_scalar as int and rejects 24.0."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that transformers reads back into the same architecture."""
    hf_kind = {"global": "full_attention", "local": "sliding_attention"}
    base = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        dtype=cfg.param_dtype,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if cfg.family == "griffin":
        if cfg.num_heads * cfg.head_dim != cfg.d_model:
            raise HFFormatError(
                "RecurrentGemma in transformers needs num_heads * head_dim == d_model"
            )
        if cfg.final_logit_softcap is None or cfg.attn_logit_softcap is not None:
            raise HFFormatError("RecurrentGemma in transformers always caps final logits only")
        if "global" in cfg.layer_pattern or cfg.rope_base != cfg.rope_local_base:
            raise HFFormatError("RecurrentGemma in transformers has only local attention layers")
        return dict(
            base,
            architectures=["RecurrentGemmaForCausalLM"],
            model_type="recurrent_gemma",
            intermediate_size=2 * cfg.ffw_dim,
            lru_width=cfg.lru_width,
            attention_window_size=cfg.sliding_window,
            conv1d_width=cfg.conv_width,
            logits_soft_cap=cfg.final_logit_softcap,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=cfg.rope_base,
                partial_rotary_factor=cfg.rope_fraction,
            ),
            block_types=[
                "recurrent" if k == "recurrent" else "attention" for k in cfg.layer_pattern
            ],
        )
    if cfg.rope_fraction != 1.0:
        raise HFFormatError(f"{cfg.family} in transformers has no partial RoPE")
    base["intermediate_size"] = cfg.ffw_dim
    if cfg.family == "gemma":
        if cfg.layer_pattern != ("global",) or cfg.query_pre_attn_scalar not in (
            None,
            cfg.head_dim,
        ):
            raise HFFormatError("Gemma 1 in transformers has only global layers, head_dim scaling")
        return dict(
            base,
            architectures=["GemmaForCausalLM"],
            model_type="gemma",
            hidden_act="gelu_pytorch_tanh",
            rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base),
        )
    extra = dict(
        layer_types=[hf_kind[k] for k in cfg.layer_kinds],
        sliding_window=cfg.sliding_window or 4096,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
    )
    if cfg.family == "gemma2":
        if cfg.rope_base != cfg.rope_local_base or cfg.rope_global_scale != 1.0:
            raise HFFormatError("Gemma 2 in transformers has one RoPE base and no scaling")
        return dict(
            base,
            **extra,
            architectures=["Gemma2ForCausalLM"],
            model_type="gemma2",
            rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base),
        )
    full = dict(rope_type="default", rope_theta=cfg.rope_base)
    if cfg.rope_global_scale != 1.0:
        full = dict(rope_type="linear", rope_theta=cfg.rope_base, factor=cfg.rope_global_scale)
    return dict(
        base,
        **extra,
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        rope_parameters=dict(
            sliding_attention=dict(rope_type="default", rope_theta=cfg.rope_local_base),
            full_attention=full,
        ),
    )


# ---------------------------------------------------------------------------------------------
# tensor names and layouts

Convert = tuple[tuple, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _identity(w):
    return w


def _transpose(w):
    return w.T


def _layer_tensors(cfg: ModelConfig, kind: LayerKind) -> list[Convert]:
    """(our path inside a Block, HF name inside a layer, to ours, to HF) for one layer."""
    h, k, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    in_proj = lambda n: (lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T)
    q_in, q_out = in_proj(h)
    kv_in, kv_out = in_proj(k)
    o_in = lambda w: w.T.reshape(h, hd, d)
    o_out = lambda w: w.reshape(h * hd, d).T
    griffin = cfg.family == "griffin"
    attn = "temporal_block" if griffin else "self_attn"
    out: list[Convert] = []
    if kind == "recurrent":
        t = "temporal_block"
        for ours, theirs in (
            ("linear_y", "linear_y"),
            ("linear_x", "linear_x"),
            ("linear_out", "linear_out"),
        ):
            out.append((("temporal", ours), f"{t}.{theirs}.weight", _transpose, _transpose))
            out.append((("temporal", ours + "_bias"), f"{t}.{theirs}.bias", _identity, _identity))
        out += [
            (
                ("temporal", "conv_w"),
                f"{t}.conv_1d.weight",
                lambda w: w[:, 0, :].T,
                lambda w: w.T[:, None, :],
            ),
            (("temporal", "conv_bias"), f"{t}.conv_1d.bias", _identity, _identity),
            (("temporal", "input_gate"), f"{t}.rg_lru.input_gate_weight", _identity, _identity),
            (("temporal", "input_gate_bias"), f"{t}.rg_lru.input_gate_bias", _identity, _identity),
            (("temporal", "a_gate"), f"{t}.rg_lru.recurrent_gate_weight", _identity, _identity),
            (("temporal", "a_gate_bias"), f"{t}.rg_lru.recurrent_gate_bias", _identity, _identity),
            (("temporal", "a_param"), f"{t}.rg_lru.recurrent_param", _identity, _identity),
        ]
    else:
        out += [
            (("temporal", "q"), f"{attn}.q_proj.weight", q_in, q_out),
            (("temporal", "k"), f"{attn}.k_proj.weight", kv_in, kv_out),
            (("temporal", "v"), f"{attn}.v_proj.weight", kv_in, kv_out),
            (("temporal", "o"), f"{attn}.o_proj.weight", o_in, o_out),
        ]
        if griffin:
            out.append((("temporal", "o_bias"), f"{attn}.o_proj.bias", _identity, _identity))
        if cfg.qk_norm:
            out.append(
                (("temporal", "q_norm", "scale"), f"{attn}.q_norm.weight", _identity, _identity)
            )
            out.append(
                (("temporal", "k_norm", "scale"), f"{attn}.k_norm.weight", _identity, _identity)
            )
    mlp = "mlp_block" if griffin else "mlp"
    for ours in ("gate", "up", "down"):
        out.append((("mlp", ours), f"{mlp}.{ours}_proj.weight", _transpose, _transpose))
        if griffin:
            out.append((("mlp", ours + "_bias"), f"{mlp}.{ours}_proj.bias", _identity, _identity))
    if griffin:
        norms = [("pre_norm", "temporal_pre_norm"), ("pre_ffw_norm", "channel_pre_norm")]
    elif cfg.family == "gemma":  # HF Gemma 1's post_attention_layernorm is the pre-FFW norm
        norms = [("pre_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")]
    else:
        norms = [
            ("pre_norm", "input_layernorm"),
            ("post_norm", "post_attention_layernorm"),
            ("pre_ffw_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ]
    out += [((ours, "scale"), f"{theirs}.weight", _identity, _identity) for ours, theirs in norms]
    return out


def _tensor_plan(model_or_cfg) -> list[tuple[tuple, int | None, str, Callable, Callable]]:
    """Every tensor: (our flat path, index into the stacked unit axis or None, HF name, fns)."""
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, Transformer) else model_or_cfg
    final = "final_norm" if cfg.family == "griffin" else "norm"
    plan = [
        (("embed",), None, "embed_tokens.weight", _identity, _identity),
        (("final_norm", "scale"), None, f"{final}.weight", _identity, _identity),
    ]
    pattern = len(cfg.layer_pattern)
    num_units = cfg.num_layers // pattern
    for i, kind in enumerate(cfg.layer_kinds):
        if i < num_units * pattern:
            where, unit, slot = "units", i // pattern, i % pattern
        else:
            where, unit, slot = "tail", None, i - num_units * pattern
        for ours, theirs, to_ours, to_hf in _layer_tensors(cfg, kind):
            path = (where, "blocks", slot, *ours)
            plan.append((path, unit, f"layers.{i}.{theirs}", to_ours, to_hf))
    return plan


# ---------------------------------------------------------------------------------------------
# load / save


class _Tensors:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, str] = {}
        self.handles = {}
        for f in files:
            if not (path / f).exists():
                raise HFFormatError(f"{path / f}: listed in the index but missing")
            self.handles[f] = safe_open(str(path / f), framework="flax")
            for key in self.handles[f].keys():
                self.where[key] = f
        self.path = path

    def prefix(self) -> str:
        for p in ("model.", "model.language_model.", "language_model.model.", ""):
            if p + "embed_tokens.weight" in self.where:
                return p
        raise HFFormatError(
            f"{self.path}: no embed_tokens.weight found; is this a Gemma checkpoint?"
        )

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise HFFormatError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return np.asarray(self.handles[self.where[name]].get_tensor(name))


def load_hf(path: str | Path, **overrides) -> Transformer:
    """A Transformer with the weights of a Hugging Face checkpoint directory.

    `overrides` are ModelConfig fields (e.g. param_dtype="bfloat16", scan_layers=False).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise HFFormatError(f"{cfg_file}: not found (expected a Hugging Face checkpoint directory)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), where=str(cfg_file), **overrides)
    tensors = _Tensors(path)
    prefix = tensors.prefix()

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shapes = {p: v.get_value() for p, v in abstract.flat_state()}
    arrays = {p: np.zeros(s.shape, np.float32) for p, s in shapes.items()}
    seen = set()
    for ours, unit, theirs, to_ours, _ in _tensor_plan(cfg):
        raw = tensors.get(prefix + theirs)
        w = to_ours(raw.astype(np.float32))
        target = arrays[ours] if unit is None else arrays[ours][unit]
        if w.shape != target.shape:
            raise HFFormatError(
                f"{path}: tensor {prefix + theirs!r} has shape {raw.shape}, which does not fit "
                f"{'/'.join(map(str, ours))} of shape {target.shape} for this config"
            )
        target[...] = w
        seen.add(ours)
    missing = set(arrays) - seen
    assert not missing, f"no HF tensor for {missing}"  # a bug in _tensor_plan, not in the file
    pd = jnp.dtype(cfg.param_dtype)
    pure = traversals.unflatten_mapping({p: jnp.asarray(a, pd) for p, a in arrays.items()})
    abstract.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, abstract)


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face names and layouts (prefix `model.`)."""
    params = nnx.state(model, nnx.Param).flat_state()
    flat = {p: np.asarray(jax.device_get(v.get_value()), np.float32) for p, v in params}
    out = {}
    for ours, unit, theirs, _, to_hf in _tensor_plan(model):
        w = flat[ours] if unit is None else flat[ours][unit]
        out["model." + theirs] = np.ascontiguousarray(to_hf(w))
    return out


def save_hf(model: Transformer, path: str | Path, *, dtype: str | None = None) -> Path:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads."""
    from safetensors.flax import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.cfg.param_dtype
    config = config_to_hf(model.cfg)
    config["dtype"] = dtype
    tensors = {k: jnp.asarray(v, jnp.dtype(dtype)) for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
