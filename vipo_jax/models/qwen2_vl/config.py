"""Qwen2-VL configuration, with the field names of transformers' ``Qwen2VLConfig`` /
``Qwen2VLTextConfig`` / ``Qwen2VLVisionConfig`` (``config.json``) plus the runtime options of every
port.

Two file layouts exist and both are read: the released checkpoints (e.g. Qwen/Qwen2-VL-2B-Instruct,
written by transformers 4.4x) keep the text fields at the top level with ``rope_theta`` and
``rope_scaling = {"type": "mrope", "mrope_section": [...]}`` and spell the vision input channels
``in_chans``; transformers 5 writes a nested ``text_config`` with ``rope_parameters`` and
``in_channels``. The vision RoPE base (fixed at 10000 in transformers 4.45) is ``rope_theta`` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.config_io import (
    RUNTIME_FIELDS,
    architecture_dict,
    normalize_runtime,
    pick_fields,
    read_config_json,
)

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (runtime options left out)."""
        return architecture_dict(self)

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)


def _rope_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE settings of a text config dict: ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` + ``rope_theta`` (the released files)."""
    out: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        sub = d.get(key)
        if isinstance(sub, Mapping):
            out.update(sub)
    if "rope_theta" in d and d["rope_theta"] is not None:
        out.setdefault("rope_theta", d["rope_theta"])
    return out


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig(_Config):
    """The vision tower: 14 px x 2-frame patches, ``depth`` pre-LN ViT blocks with 2-D RoPE and
    per-frame-pair attention, then a 2x2 PatchMerger to ``hidden_size`` (the text width)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        what = "Qwen2VLVisionConfig"
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{what}: embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"{what}: head_dim {self.head_dim} must be a multiple of 4 (2-D RoPE)")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"{what}.hidden_act {self.hidden_act!r} is not supported; choose one of "
                              f"{VISION_ACTIVATIONS}")
        for name in ("patch_size", "temporal_patch_size", "spatial_merge_size", "depth"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{what}.{name} must be >= 1, got {getattr(self, name)}")
        normalize_runtime(self, what)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        """Width of the PatchMerger's input (``spatial_merge_size**2`` tokens concatenated)."""
        return self.embed_dim * self.spatial_merge_size**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Qwen2VLVisionConfig:
        d = dict(d)
        if "in_channels" not in d and "in_chans" in d:
            d["in_channels"] = d["in_chans"]
        rope = d.get("rope_parameters")
        if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
            d.setdefault("rope_theta", rope["rope_theta"])
        for key in ("patch_size", "temporal_patch_size"):
            v = d.get(key)
            if isinstance(v, list | tuple):
                if len(set(v)) != 1:
                    raise ConfigError(f"Qwen2VLVisionConfig: only a single {key} is supported, got {v}")
                d[key] = int(v[0])
        return cls(**pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS))


@dataclasses.dataclass(frozen=True)
class Qwen2VLTextConfig(_Config):
    """The Qwen2 decoder: GQA attention with (M-)RoPE, RMSNorm, SwiGLU MLP."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    use_sliding_window: bool = False
    tie_word_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        what = "Qwen2VLTextConfig"
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{what}: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{what}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{what}: head_dim {self.head_dim} must be even (RoPE)")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(f"{what}: mrope_section {list(self.mrope_section)} must be 3 sizes summing to "
                              f"head_dim / 2 = {self.head_dim // 2}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"{what}.hidden_act {self.hidden_act!r} is not supported (Qwen2 uses silu)")
        if self.use_sliding_window:
            raise ConfigError(f"{what}: use_sliding_window=True is not implemented (Qwen2-VL releases set it "
                              "false)")
        normalize_runtime(self, what)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Qwen2VLTextConfig:
        d = dict(d)
        rope = _rope_dict(d)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"Qwen2VLTextConfig: rope type {rope_type!r} is not supported (only default / "
                              "mrope)")
        if rope.get("rope_theta") is not None:
            d["rope_theta"] = rope["rope_theta"]
        if rope.get("mrope_section") is not None:
            d["mrope_section"] = tuple(rope["mrope_section"])
        return cls(**pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS))


_TOP_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(_Config):
    """The whole model; the runtime options apply to both towers."""

    text_config: Qwen2VLTextConfig = dataclasses.field(default_factory=Qwen2VLTextConfig)
    vision_config: Qwen2VLVisionConfig = dataclasses.field(default_factory=Qwen2VLVisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        normalize_runtime(self, "Qwen2VLConfig")
        rt = {k: getattr(self, k) for k in RUNTIME_FIELDS}
        object.__setattr__(self, "text_config", self.text_config.replace(**rt))
        object.__setattr__(self, "vision_config", self.vision_config.replace(**rt))
        if self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ConfigError(f"Qwen2VLConfig: vision_config.hidden_size {self.vision_config.hidden_size} (the "
                              f"merger's output) != text hidden_size {self.text_config.hidden_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Qwen2VLConfig:
        """From a transformers ``config.json`` dict, flat (released files) or nested (transformers 5).
        ``overrides``: top-level fields, runtime options, and ``text_config`` / ``vision_config``
        dicts of tower fields (e.g. ``text_config={"vocab_size": 151660}``)."""
        overrides = dict(overrides)
        text = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        if isinstance(d.get("text_config"), Mapping):
            nested = dict(d["text_config"])
            # rope settings may sit at either level; the nested ones win like in transformers
            for key in ("rope_scaling", "rope_parameters", "rope_theta"):
                if key in nested and nested[key] is None:
                    nested.pop(key)
            text.update(nested)
        towers = {}
        for key, tower, sub in (("text_config", Qwen2VLTextConfig, text),
                                ("vision_config", Qwen2VLVisionConfig, dict(d.get("vision_config") or {}))):
            extra = overrides.pop(key, None) or {}
            if dataclasses.is_dataclass(extra):
                extra = dataclasses.asdict(extra)
            sub = {k: v for k, v in sub.items() if k not in RUNTIME_FIELDS}
            towers[key] = tower.from_dict(sub, **{k: v for k, v in dict(extra).items() if k not in RUNTIME_FIELDS})
        kw = pick_fields(cls, {k: d[k] for k in _TOP_KEYS if k in d and d[k] is not None}, overrides)
        return cls(**towers, **kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> Qwen2VLConfig:
        d = read_config_json(folder, what="transformers Qwen2-VL model folder")
        if d.get("model_type") not in (None, "qwen2_vl"):
            raise CheckpointError(f"{folder}: config.json has model_type {d.get('model_type')!r}, not 'qwen2_vl'")
        if "vision_config" not in d:
            raise CheckpointError(f"{folder}: config.json has no vision_config: not a Qwen2-VL model")
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A transformers-5-style ``config.json`` dict (runtime options left out)."""
        text = self.text_config.to_dict()
        mrope = list(text.pop("mrope_section"))
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                   "mrope_section": mrope}
        vision = self.vision_config.to_dict()
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
        return {"model_type": "qwen2_vl", "text_config": text, "vision_config": vision,
                **{k: getattr(self, k) for k in _TOP_KEYS}}


# Qwen/Qwen2-VL-2B-Instruct config.json, as published (transformers 4.41 layout).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2_vl",
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
    },
}


def preset(name: str, **overrides: Any) -> Qwen2VLConfig:
    """``preset("qwen2-vl-2b")``: the architecture of Qwen/Qwen2-VL-2B-Instruct (the VideoAlign base),
    e.g. to build the model abstractly with ``nnx.eval_shape`` for planning."""
    if name not in PRESETS:
        raise ConfigError(f"unknown Qwen2-VL preset {name!r}; choose from {sorted(PRESETS)}")
    return Qwen2VLConfig.from_dict(PRESETS[name], **overrides)
