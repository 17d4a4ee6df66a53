"""Configuration of the FLUX.1 DiT (diffusers ``FluxTransformer2DModel``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import normalize_runtime, pick_fields, read_config_json


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Field names are those of diffusers' ``transformer/config.json``; the last four are runtime
    options (parameter dtype, compute dtype, remat policy name, attention kernel name)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    # runtime options
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    # Constants of the architecture (not in config.json).
    rope_theta = 10000
    mlp_ratio = 4.0
    timestep_channels = 256

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        normalize_runtime(self, "FluxConfig")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"FluxConfig: sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                f"attention_head_dim={self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"FluxConfig.axes_dims_rope must be even, got {self.axes_dims_rope}")
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise ConfigError("FluxConfig: num_layers and num_single_layers must be >= 0")

    # Derived sizes.
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    def replace(self, **changes: Any) -> FluxConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> FluxConfig:
        return cls(**pick_fields(cls, d, overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> FluxConfig:
        """Read ``config.json`` of a diffusers transformer folder (or of a pipeline root's
        ``transformer/`` subfolder)."""
        d = read_config_json(folder, subfolders=("transformer",), class_names=("FluxTransformer2DModel",),
                             what="diffusers FLUX transformer folder")
        return cls.from_dict(d, **overrides)


# Real FLUX.1 sizes (black-forest-labs/FLUX.1-dev and FLUX.1-schnell transformer/config.json).
PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(guidance_embeds=True),
    "flux-schnell": FluxConfig(guidance_embeds=False),
}


def preset(name: str, **overrides: Any) -> FluxConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown FLUX preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
