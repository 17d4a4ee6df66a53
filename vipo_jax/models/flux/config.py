"""Configuration of the FLUX.1 DiT (diffusers ``FluxTransformer2DModel``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.nn.attention import available_attention
from vipo_jax.nn.stack import REMAT_POLICIES

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


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
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if not isinstance(value, str):  # a numpy / jnp dtype or scalar type
                value = jnp.dtype(value).name
            if value not in _FLOAT_DTYPES:
                raise ConfigError(f"FluxConfig.{name} must be one of {_FLOAT_DTYPES}, got {value!r}")
            object.__setattr__(self, name, value)
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"FluxConfig.remat {self.remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
        if self.attention not in available_attention():
            raise ConfigError(
                f"FluxConfig.attention {self.attention!r} unknown; available: {available_attention()}"
            )
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown FluxConfig options {unknown}; valid: {sorted(names)}")
        kw = {k: v for k, v in d.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> FluxConfig:
        """Read ``config.json`` of a diffusers transformer folder (or of a pipeline root's
        ``transformer/`` subfolder)."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file() and (folder / "transformer" / "config.json").is_file():
            path = folder / "transformer" / "config.json"
        if not path.is_file():
            raise CheckpointError(f"no config.json in {folder}: not a diffusers FLUX transformer folder")
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable {path}: {e}") from e
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != "FluxTransformer2DModel":
            raise CheckpointError(f"{path} describes a {cls_name}, not a FluxTransformer2DModel")
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
