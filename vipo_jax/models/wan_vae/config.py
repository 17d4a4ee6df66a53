"""Configuration of the Wan2.1 video VAE (diffusers ``AutoencoderKLWan``).

Field names are those of diffusers' ``vae/config.json``; defaults are diffusers' defaults (which
are the Wan2.1 VAE), so a config.json that omits a field means what it means to diffusers.
:meth:`WanVAEConfig.wan21` is the real Wan2.1 VAE (shared by the T2V 1.3B and 14B pipelines).
Wan 2.2's residual / patchified VAE (``is_residual``, ``patch_size``) is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import normalize_runtime, pick_fields, read_config_json

# Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers vae/config.json; latents_mean / latents_std are the
# per-channel statistics the Wan pipelines normalise latents with (diffusers' class defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN),
    "latents_std": list(WAN21_LATENTS_STD),
}

ENCODER_CHUNK = 4  # frames per encoder chunk after the first frame (fixed in the reference)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """diffusers' ``AutoencoderKLWan`` arguments (``temperal`` is diffusers' spelling), plus the
    runtime options ``param_dtype``, ``dtype`` (compute) and ``attention`` (mid-block kernel).
    ``dropout`` is accepted and ignored: this port is for inference."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    # Runtime options (not in diffusers' config.json).
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"WanVAEConfig.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        normalize_runtime(self, "WanVAEConfig")
        if self.is_residual or self.patch_size not in (None, 1):
            raise ConfigError(
                f"WanVAEConfig: is_residual={self.is_residual}, patch_size={self.patch_size} is the Wan 2.2 "
                "(TI2V) VAE, which is not supported; only the Wan 2.1 VAE (also used by Wan 2.2 A14B) is")
        n = len(self.dim_mult)
        if n < 1 or any(int(m) < 1 for m in self.dim_mult):
            raise ConfigError(f"WanVAEConfig.dim_mult must be positive multipliers, got {self.dim_mult}")
        if len(self.temperal_downsample) != n - 1:
            raise ConfigError(
                f"WanVAEConfig: temperal_downsample {self.temperal_downsample} needs {n - 1} entries "
                f"(one per downsampling stage of dim_mult {self.dim_mult})")
        if sum(self.temperal_downsample) > 2:
            raise ConfigError(
                f"WanVAEConfig: {sum(self.temperal_downsample)} temporal downsamplings; the encoder runs "
                f"chunks of {ENCODER_CHUNK} frames, so at most 2 are possible")
        if self.attn_scales:
            raise ConfigError(
                f"WanVAEConfig.attn_scales={self.attn_scales}: encoder attention blocks are not supported "
                "(Wan 2.1 has none, and diffusers' chunked encoder cannot run them either)")
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ConfigError(f"WanVAEConfig.decoder_base_dim must be >= 1, got {self.decoder_base_dim}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"WanVAEConfig: latents_mean ({len(self.latents_mean)}) and latents_std "
                f"({len(self.latents_std)}) need z_dim={self.z_dim} values")
        if any(s == 0 for s in self.latents_std):
            raise ConfigError("WanVAEConfig.latents_std has a zero")
        if self.scale_factor_spatial not in (None, self.spatial_factor):
            raise ConfigError(
                f"WanVAEConfig.scale_factor_spatial={self.scale_factor_spatial} but dim_mult {self.dim_mult} "
                f"downsamples {self.spatial_factor}x: a layout this port does not know")
        if self.scale_factor_temporal not in (None, self.temporal_factor):
            raise ConfigError(
                f"WanVAEConfig.scale_factor_temporal={self.scale_factor_temporal} but temperal_downsample "
                f"{self.temperal_downsample} downsamples {self.temporal_factor}x: a layout this port does not know")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Per decoder up block (the last has no upsampler): the encoder's flags reversed."""
        return tuple(reversed(self.temperal_downsample))

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames`` (which must be 1 + 4k)."""
        return 1 + (num_frames - 1) // self.temporal_factor

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latent frames: the first, then ``temporal_factor`` each."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    def replace(self, **changes: Any) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> WanVAEConfig:
        return cls(**pick_fields(cls, d, overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> WanVAEConfig:
        """Read ``config.json`` of a diffusers ``vae/`` folder (or of a pipeline root's ``vae/``)."""
        d = read_config_json(folder, subfolders=("vae",), class_names=("AutoencoderKLWan",),
                             what="diffusers Wan VAE folder")
        return cls.from_dict(d, **overrides)

    @classmethod
    def wan21(cls, **overrides: Any) -> WanVAEConfig:
        """The Wan2.1 VAE: z_dim 16, 8x spatial and 4x temporal compression."""
        return cls.from_dict(WAN21_VAE, **overrides)
