"""BLIP configurations: the ViT image encoder, the BERT text encoder with cross-attention to the
image tokens (BLIP's ``med.py``), and ImageReward (both plus a linear MLP head).

Field names: the text config uses the names of BLIP's ``med_config.json`` (a BERT config with
``encoder_width`` and ``add_cross_attention``), so ImageReward's own ``med_config.json`` can be
read as is; the vision config uses transformers' ``BlipVisionConfig`` names (BLIP builds its ViT in
code, there is no file). The defaults are the ImageReward-v1.0 release: ViT-L/16 at 224 (timm
``VisionTransformer`` with LayerNorm eps 1e-6) and bert-base with the two tokens BLIP adds
([DEC], [ENC]: vocabulary 30524).
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

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# ImageReward.py: ``rewards = (mlp(features) - mean) / std`` with these constants of the release.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MODEL_TYPE = "image_reward"


def _check_width(cfg: Any, what: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{what}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                          f"{cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{what}.hidden_act {cfg.hidden_act!r} is not supported; choose one of {ACTIVATIONS}")
    normalize_runtime(cfg, what)


class _Config:
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any):
        """From a reference dict; unknown keys of ``d`` are ignored, unknown overrides refused."""
        return cls(**pick_fields(cls, d, overrides, skip=("dtype",)))

    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (runtime options left out)."""
        return architecture_dict(self)

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig(_Config):
    """BLIP's ``VisionTransformer`` (timm ViT: pre-LN blocks, fused qkv with bias, final norm)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        for name in ("image_size", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, list | tuple):
                if len(set(v)) != 1:
                    raise ConfigError(f"BlipVisionConfig.{name}: only square sizes are supported, got {v}")
                object.__setattr__(self, name, int(v[0]))
        if self.image_size % self.patch_size:
            raise ConfigError(f"BlipVisionConfig: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        _check_width(self, "BlipVisionConfig")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class BlipTextConfig(_Config):
    """BLIP's ``med.py`` ``BertModel`` (post-LN BERT, absolute positions, no token types); with
    ``add_cross_attention`` every layer also attends to ``encoder_width``-wide image tokens."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    encoder_width: int = 1024
    add_cross_attention: bool = True
    pad_token_id: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        _check_width(self, "BlipTextConfig")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> BlipTextConfig:
        pos = d.get("position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise ConfigError(f"BlipTextConfig: position_embedding_type {pos!r} is not supported (absolute only)")
        d = dict(d)
        if "encoder_width" not in d and "encoder_hidden_size" in d:  # transformers' BlipTextConfig name
            d["encoder_width"] = d["encoder_hidden_size"]
        return cls(**pick_fields(cls, d, overrides, skip=("dtype",)))

    @classmethod
    def from_med_config(cls, path: str | Path, **overrides: Any) -> BlipTextConfig:
        """Read BLIP's / ImageReward's ``med_config.json``."""
        return cls.from_dict(read_config_json(path, what="BLIP med_config.json"), **overrides)


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    """ImageReward: BLIP ViT + BLIP text encoder (cross-attending to the ViT output) + a stack of
    linear layers (no activations, as released) on the first text token, then
    ``(reward - reward_mean) / reward_std``. ``BLIP_Pretrain`` sets the text encoder's
    ``encoder_width`` to the vision width; so does this config."""

    vision_config: BlipVisionConfig = dataclasses.field(default_factory=BlipVisionConfig)
    text_config: BlipTextConfig = dataclasses.field(default_factory=BlipTextConfig)
    mlp_hidden_sizes: tuple[int, ...] = (1024, 128, 64, 16)
    reward_mean: float = IMAGE_REWARD_MEAN
    reward_std: float = IMAGE_REWARD_STD
    max_length: int = 35
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        normalize_runtime(self, "ImageRewardConfig")
        object.__setattr__(self, "mlp_hidden_sizes", tuple(int(h) for h in self.mlp_hidden_sizes))
        if not self.mlp_hidden_sizes or min(self.mlp_hidden_sizes) <= 0:
            raise ConfigError(f"ImageRewardConfig.mlp_hidden_sizes must be positive, got {self.mlp_hidden_sizes}")
        if not self.reward_std > 0:
            raise ConfigError(f"ImageRewardConfig.reward_std must be > 0, got {self.reward_std}")
        if self.max_length > self.text_config.max_position_embeddings:
            raise ConfigError(f"ImageRewardConfig.max_length {self.max_length} > the text encoder's "
                              f"max_position_embeddings {self.text_config.max_position_embeddings}")
        if not self.text_config.add_cross_attention:
            raise ConfigError("ImageRewardConfig: the text encoder needs add_cross_attention=True")
        rt = {k: getattr(self, k) for k in RUNTIME_FIELDS}
        object.__setattr__(self, "vision_config", self.vision_config.replace(**rt))
        object.__setattr__(self, "text_config", self.text_config.replace(
            encoder_width=self.vision_config.hidden_size, **rt))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> ImageRewardConfig:
        """From our ``config.json`` (``vision_config`` / ``text_config`` dicts plus head fields).
        ``overrides`` may hold top-level fields, runtime options, and ``vision_config`` /
        ``text_config`` dicts (or configs) merged into the towers' fields."""
        overrides = dict(overrides)
        towers = {}
        for key, tower in (("vision_config", BlipVisionConfig), ("text_config", BlipTextConfig)):
            sub = {k: v for k, v in dict(d.get(key) or {}).items() if k not in RUNTIME_FIELDS}
            extra = overrides.pop(key, None) or {}
            if isinstance(extra, BlipVisionConfig | BlipTextConfig):
                extra = extra.to_dict()
            towers[key] = tower.from_dict({**sub, **dict(extra)})
        kw = pick_fields(cls, {k: v for k, v in d.items() if k not in ("vision_config", "text_config")},
                         overrides, skip=("dtype",))
        return cls(**towers, **kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> ImageRewardConfig:
        """Read the ``config.json`` that ``python -m vipo_jax.convert image-reward`` writes."""
        d = read_config_json(folder, what="converted ImageReward folder (python -m vipo_jax.convert image-reward)")
        if d.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{folder}: config.json describes model_type {d.get('model_type')!r}, not "
                                  f"{MODEL_TYPE!r}; convert ImageReward.pt with python -m vipo_jax.convert "
                                  "image-reward")
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Our ``config.json`` (runtime options left out)."""
        return {"model_type": MODEL_TYPE, "vision_config": self.vision_config.to_dict(),
                "text_config": self.text_config.to_dict(), "mlp_hidden_sizes": list(self.mlp_hidden_sizes),
                "reward_mean": self.reward_mean, "reward_std": self.reward_std, "max_length": self.max_length}

    def replace(self, **kw: Any) -> ImageRewardConfig:
        return dataclasses.replace(self, **kw)
