"""Configuration of the KL autoencoder (diffusers ``AutoencoderKL``), as used by FLUX.1 and SD.

Field names are those of diffusers' ``vae/config.json``; defaults are diffusers' defaults, so a
config.json that omits a field means what it means to diffusers. :meth:`AutoencoderKLConfig.flux1`
is the real FLUX.1 VAE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import normalize_runtime, pick_fields, read_config_json

_DOWN_BLOCKS = ("DownEncoderBlock2D",)
_UP_BLOCKS = ("UpDecoderBlock2D",)
_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Runtime options (not in diffusers' config.json).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # per encoder/decoder block; a name from vipo_jax.nn.stack.REMAT_POLICIES
    attention: str = "xla"  # mid-block attention kernel, a name from vipo_jax.nn.attention

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"AutoencoderKLConfig.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("AutoencoderKLConfig.block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"AutoencoderKLConfig: {len(self.down_block_types)} down_block_types and "
                f"{len(self.up_block_types)} up_block_types for {n} block_out_channels; they must match"
            )
        for t in self.down_block_types:
            if t not in _DOWN_BLOCKS:
                raise ConfigError(f"AutoencoderKLConfig: unsupported down block {t!r} (have {_DOWN_BLOCKS})")
        for t in self.up_block_types:
            if t not in _UP_BLOCKS:
                raise ConfigError(f"AutoencoderKLConfig: unsupported up block type {t!r} (have {_UP_BLOCKS})")
        if self.act_fn not in _ACTIVATIONS:
            raise ConfigError(f"AutoencoderKLConfig.act_fn {self.act_fn!r} is not supported (only 'silu')")
        if self.layers_per_block < 1:
            raise ConfigError(f"AutoencoderKLConfig.layers_per_block must be >= 1: {self.layers_per_block}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"AutoencoderKLConfig: block_out_channels {self.block_out_channels} are not all "
                    f"divisible by norm_num_groups={self.norm_num_groups}"
                )
        normalize_runtime(self, "AutoencoderKLConfig")
        if not self.scaling_factor:
            raise ConfigError("AutoencoderKLConfig.scaling_factor must be non-zero")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def shift(self) -> float:
        """``shift_factor`` with None read as 0."""
        return 0.0 if self.shift_factor is None else float(self.shift_factor)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> AutoencoderKLConfig:
        return cls(**pick_fields(cls, d, overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> AutoencoderKLConfig:
        d = read_config_json(folder, class_names=("AutoencoderKL",), what="diffusers vae/ folder")
        return cls.from_dict(d, **overrides)

    @classmethod
    def flux1(cls, **overrides: Any) -> AutoencoderKLConfig:
        """The FLUX.1 (dev / schnell) VAE: 16 latent channels, no quant convs, 8x downsampling."""
        return cls.from_dict(FLUX1_VAE, **overrides)


# black-forest-labs/FLUX.1-dev vae/config.json (act_fn silu, latents_mean/std null).
FLUX1_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
