"""The one configuration that describes every Gemma-family decoder.

Gemma 1, 2, 3 and RecurrentGemma (Griffin) differ in a handful of switches (post-norms, QK-norm,
soft-caps, the local/global/recurrent layer pattern, RoPE bases, biases). Keeping them in one
frozen, validated schema means one decoder implementation, one Hugging Face converter and one
set of presets; a YAML file or a preset name fills it in (`train/models/presets.py`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

Family = Literal["gemma", "gemma2", "gemma3", "griffin"]
LayerKind = Literal["global", "local", "recurrent"]
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "save_matmuls"]


class ModelConfig(BaseModel):
    """Architecture and numerics of one decoder. Field names follow the Gemma reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_dim: int  # width of ONE GeGLU branch
    # The pattern of temporal-mixing layers, repeated from layer 0 and truncated to num_layers.
    layer_pattern: tuple[LayerKind, ...] = ("global",)
    sliding_window: int | None = None  # W keys including the query itself (HF convention)
    query_pre_attn_scalar: float | None = None  # queries are scaled by this**-0.5; None: head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    rope_base: float = 10_000.0  # global layers
    rope_local_base: float = 10_000.0  # local (sliding-window) layers
    rope_global_scale: float = 1.0  # linear position interpolation factor, global layers only
    rope_fraction: float = 1.0  # Griffin rotates only the first half of head_dim
    lru_width: int | None = None  # Griffin recurrent width
    conv_width: int = 4  # Griffin temporal conv width
    norm_eps: float = 1e-6
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    scan_layers: bool = True  # one compiled block per repetition of layer_pattern
    remat: Remat = "none"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if "local" in self.layer_pattern and not self.sliding_window:
            raise ValueError("layer_pattern has 'local' layers, so sliding_window must be set")
        if "recurrent" in self.layer_pattern:
            if self.family != "griffin":
                raise ValueError("'recurrent' layers exist only in family 'griffin'")
            if not self.lru_width or self.lru_width % self.num_heads:
                raise ValueError("griffin needs lru_width, a multiple of num_heads")
        elif self.family == "griffin":
            raise ValueError("family 'griffin' needs 'recurrent' in layer_pattern")
        rope_dim = int(self.head_dim * self.rope_fraction)
        if rope_dim % 2:
            raise ValueError(f"head_dim * rope_fraction = {rope_dim} must be even")
        if not self.layer_pattern:
            raise ValueError("layer_pattern must not be empty")
        return self

    # Derived switches: kept as properties so that a config cannot contradict itself.
    @property
    def post_norms(self) -> bool:
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def biases(self) -> bool:
        """Griffin has biases on its MLP, recurrent projections and attention output."""
        return self.family == "griffin"

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        """sqrt(d_model); Griffin rounds it to bfloat16 to match its training (and HF)."""
        s = math.sqrt(self.d_model)
        if self.family == "griffin":
            import ml_dtypes
            import numpy as np

            s = float(np.asarray(s, dtype=ml_dtypes.bfloat16))
        return s

    def architecture(self) -> dict:
        """The fields that decide what the weights mean, with settings that have no effect
        normalised away (a window without local layers, the default query scale spelt out):
        two configs with equal architecture() can share weights."""
        arch = self.model_dump(exclude={"param_dtype", "compute_dtype", "scan_layers", "remat"})
        arch["query_pre_attn_scalar"] = float(self.query_pre_attn_scalar or self.head_dim)
        kinds = set(self.layer_kinds)
        if "local" not in kinds:
            arch.update(sliding_window=None, rope_local_base=None)
        if "global" not in kinds:
            arch.update(rope_base=None, rope_global_scale=None)
        return arch
