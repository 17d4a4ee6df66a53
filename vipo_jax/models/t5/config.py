"""Configuration of the T5 v1.1 / UMT5 text encoder (FLUX.1 ``text_encoder_2``, Wan2.1 ``text_encoder``).

Field names are the transformers ``config.json`` names, so ``T5Config.from_pretrained(folder)`` reads
the file written by ``T5EncoderModel.save_pretrained`` / ``UMT5EncoderModel.save_pretrained``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import RUNTIME_FIELDS, normalize_runtime, pick_fields, read_config_json

# Activation names as transformers spells them (ACT2FN); "gated-gelu" maps to gelu_new (tanh).
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    model_type: str = "t5"
    # True: every layer owns a relative-attention-bias table (UMT5). False: only layer 0 has one and
    # its bias is shared by all layers (T5). ``None`` derives it from ``model_type``.
    per_layer_bias: bool | None = None
    # Runtime options.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        if self.per_layer_bias is None:
            object.__setattr__(self, "per_layer_bias", self.model_type == "umt5")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected 'gated-ACT' or 'ACT' "
                f"with ACT one of {ACTIVATIONS}"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("T5Config.relative_attention_num_buckets must be >= 4 (bidirectional buckets)")
        normalize_runtime(self, "T5Config")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The transformers activation name used in the feed-forward block."""
        if self.feed_forward_proj == "gated-gelu":  # transformers' backwards-compatible special case
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> T5Config:
        kwargs = pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS)  # a file's "dtype" is its storage dtype
        if kwargs.get("model_type", "t5") not in ("t5", "umt5", "mt5"):
            raise ConfigError(f"T5Config: model_type {kwargs['model_type']!r} is not a T5 / UMT5 encoder")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> T5Config:
        d = read_config_json(folder, what="transformers T5 / UMT5 model folder")
        return cls.from_dict(d, **overrides)

