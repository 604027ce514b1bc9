"""Named model sizes: every published Gemma-family size, plus tiny presets for CPU runs.

A preset is a mapping of `ModelConfig` field values; `get_preset(name, **overrides)` turns it
into a validated, frozen config (an override of an unknown field is an error, as in YAML). The
same mappings are shipped as `configs/models/<name>.yaml` (written by `write_yamls`, checked
equal to this registry by `tests/test_presets.py`).

    cfg = get_preset("gemma3-1b")                                   # published size
    cfg = get_preset("gemma3-tiny", compute_dtype="bfloat16")       # with an override
    PYTHONPATH=. python -m train.models.presets --write              # regenerate the YAMLs

Conventions (facts and sources in `../shared/design/gemma.md`; counts in `docs/presets.md`):
- Vocab sizes are the Hugging Face ones (the checkpoints users bring): 256000 for Gemma 1/2 and
  RecurrentGemma, 262144 for Gemma 3. The Gemma 1/2 reports count parameters with the GM
  vocab 256128 (padded); HF's Gemma 3 config defaults to 262208 (262144 + 64 extra image
  tokens), while the report and GM use 262144.
- `ffw_dim` is the width of ONE GeGLU branch (HF `intermediate_size` for Gemma 1/2/3; half of
  HF `intermediate_size` for RecurrentGemma, whose MLP splits it).
- `query_pre_attn_scalar` is spelt out where HF's config stores it (Gemma 2 and 3): head_dim,
  except d_model/num_heads for the two 27B models.
- Windows follow the HF convention (W keys including the query); RecurrentGemma's own code
  keeps W + 1 keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from train.models.config import ModelConfig

GEMMA3_PATTERN = ("local",) * 5 + ("global",)
GRIFFIN_PATTERN = ("recurrent", "recurrent", "local")

PRESETS: dict[str, dict[str, Any]] = {
    # ---- Gemma 1: all global attention, pre-norms only, RoPE base 10k.
    "gemma-2b": dict(
        family="gemma",
        vocab_size=256_000,
        num_layers=18,
        d_model=2048,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        ffw_dim=16384,
    ),
    "gemma-7b": dict(
        family="gemma",
        vocab_size=256_000,
        num_layers=28,
        d_model=3072,
        num_heads=16,
        num_kv_heads=16,
        head_dim=256,
        ffw_dim=24576,
    ),
    # ---- Gemma 2: (local, global) alternating, window 4096, soft-caps 50 / 30.
    "gemma2-2b": dict(
        family="gemma2",
        vocab_size=256_000,
        num_layers=26,
        d_model=2304,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        ffw_dim=9216,
        layer_pattern=("local", "global"),
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
    ),
    "gemma2-9b": dict(
        family="gemma2",
        vocab_size=256_000,
        num_layers=42,
        d_model=3584,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        ffw_dim=14336,
        layer_pattern=("local", "global"),
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
    ),
    "gemma2-27b": dict(
        family="gemma2",
        vocab_size=256_000,
        num_layers=46,
        d_model=4608,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        ffw_dim=36864,
        layer_pattern=("local", "global"),
        sliding_window=4096,
        query_pre_attn_scalar=144,  # d_model / num_heads, not head_dim
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
    ),
    # ---- Gemma 3: 5 local : 1 global, QK-norm, no soft-caps; RoPE local 10k, global 1M.
    "gemma3-270m": dict(
        family="gemma3",
        vocab_size=262_144,
        num_layers=18,
        d_model=640,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        ffw_dim=2048,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
    ),
    "gemma3-1b": dict(
        family="gemma3",
        vocab_size=262_144,
        num_layers=26,
        d_model=1152,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        ffw_dim=6912,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
    ),
    "gemma3-4b": dict(
        family="gemma3",
        vocab_size=262_144,
        num_layers=34,
        d_model=2560,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        ffw_dim=10240,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=1024,
        query_pre_attn_scalar=256,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        rope_global_scale=8.0,
    ),
    "gemma3-12b": dict(
        family="gemma3",
        vocab_size=262_144,
        num_layers=48,
        d_model=3840,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        ffw_dim=15360,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=1024,
        query_pre_attn_scalar=256,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        rope_global_scale=8.0,
    ),
    "gemma3-27b": dict(
        family="gemma3",
        vocab_size=262_144,
        num_layers=62,
        d_model=5376,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        ffw_dim=21504,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=1024,
        query_pre_attn_scalar=168,  # d_model / num_heads, not head_dim
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        rope_global_scale=8.0,
    ),
    # ---- RecurrentGemma (Griffin): (recurrent, recurrent, local MQA), lru_width = d_model,
    # MLP branch 3 * d_model, RoPE on half of head_dim, final soft-cap 30.
    "recurrentgemma-2b": dict(
        family="griffin",
        vocab_size=256_000,
        num_layers=26,
        d_model=2560,
        num_heads=10,
        num_kv_heads=1,
        head_dim=256,
        ffw_dim=7680,  # HF intermediate_size 15360 = 2 branches
        layer_pattern=GRIFFIN_PATTERN,
        sliding_window=2048,
        final_logit_softcap=30.0,
        rope_fraction=0.5,
        lru_width=2560,
    ),
    "recurrentgemma-9b": dict(
        family="griffin",
        vocab_size=256_000,
        num_layers=38,
        d_model=4096,
        num_heads=16,
        num_kv_heads=1,
        head_dim=256,
        ffw_dim=12288,  # HF intermediate_size 24576 = 2 branches
        layer_pattern=GRIFFIN_PATTERN,
        sliding_window=2048,
        final_logit_softcap=30.0,
        rope_fraction=0.5,
        lru_width=4096,
    ),
    # ---- Tiny presets for CPU runs and tests. Unrolled (scan_layers=False): at a few layers the
    # scan costs more on CPU (1.75x slower train step for gemma3-tiny) than it saves in compile.
    # One 4096-token vocab for all, so that any tiny teacher can distil into any tiny student;
    # windows of 64 so that local attention differs from global attention at sequence length 256.
    # Student, ~2M parameters. 6 layers so that the 5:1 pattern holds one global layer.
    "gemma3-tiny": dict(
        family="gemma3",
        scan_layers=False,  # a few layers: unrolled runs ~1.7x faster on CPU
        vocab_size=4096,
        num_layers=6,
        d_model=128,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        ffw_dim=512,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=64,
        query_pre_attn_scalar=32,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
    ),
    # Teacher, ~9M parameters. 8 layers: one full 6-layer unit plus a 2-layer tail.
    "gemma3-tiny-teacher": dict(
        family="gemma3",
        scan_layers=False,  # a few layers: unrolled runs ~1.7x faster on CPU
        vocab_size=4096,
        num_layers=8,
        d_model=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        ffw_dim=1024,
        layer_pattern=GEMMA3_PATTERN,
        sliding_window=64,
        query_pre_attn_scalar=64,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
    ),
    "gemma2-tiny": dict(
        family="gemma2",
        scan_layers=False,  # a few layers: unrolled runs ~1.7x faster on CPU
        vocab_size=4096,
        num_layers=4,
        d_model=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        ffw_dim=512,
        layer_pattern=("local", "global"),
        sliding_window=64,
        query_pre_attn_scalar=32,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
    ),
    "gemma-tiny": dict(
        family="gemma",
        scan_layers=False,  # a few layers: unrolled runs ~1.7x faster on CPU
        vocab_size=4096,
        num_layers=4,
        d_model=128,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        ffw_dim=512,
    ),
    # 6 layers = two (recurrent, recurrent, local) units.
    "recurrentgemma-tiny": dict(
        family="griffin",
        scan_layers=False,  # a few layers: unrolled runs ~1.7x faster on CPU
        vocab_size=4096,
        num_layers=6,
        d_model=128,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        ffw_dim=384,
        layer_pattern=GRIFFIN_PATTERN,
        sliding_window=64,
        final_logit_softcap=30.0,
        rope_fraction=0.5,
        lru_width=128,
    ),
}

YAML_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of preset `name`, with `overrides` applied (validated like any config)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}"
        )
    return ModelConfig(**{**PRESETS[name], **overrides})


def preset_yaml(name: str) -> str:
    """The YAML text of one preset: the registry mapping, tuples written as lists."""
    import yaml

    def scalar(v) -> str:
        return yaml.safe_dump(v).removesuffix("\n").removesuffix("\n...")

    lines = [f"# Model preset {name!r}; generated from train/models/presets.py, do not edit."]
    for key, value in PRESETS[name].items():
        if isinstance(value, tuple):
            lines.append(f"{key}: [{', '.join(scalar(v) for v in value)}]")
        else:
            lines.append(f"{key}: {scalar(value)}")
    return "\n".join(lines) + "\n"


def write_yamls(directory: Path = YAML_DIR) -> list[Path]:
    """Write configs/models/<name>.yaml for every preset."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = directory / f"{name}.yaml"
        path.write_text(preset_yaml(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        for p in write_yamls():
            print(p)
    else:
        for name in PRESETS:
            print(name)
