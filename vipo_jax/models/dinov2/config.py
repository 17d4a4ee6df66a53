"""DINOv2 configuration, with the field names of transformers' ``Dinov2Config`` /
``Dinov2WithRegistersConfig`` (``config.json``) plus the runtime options of every port."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import RUNTIME_FIELDS, normalize_runtime, pick_fields, read_config_json

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish", "relu")


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    use_mask_token: bool = True
    # runtime options (never read from config.json)
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"Dinov2Config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"Dinov2Config: unsupported hidden_act {self.hidden_act!r}; "
                              f"supported: {list(_ACTIVATIONS)}")
        normalize_runtime(self, "Dinov2Config")
        if self.num_register_tokens < 0:
            raise ConfigError("Dinov2Config: num_register_tokens must be >= 0")
        if self.image_size < self.patch_size:
            raise ConfigError(f"Dinov2Config: image_size {self.image_size} < patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """Patch positions of the learned position embedding (a square grid)."""
        return self.position_grid**2

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP; for SwiGLU, of each of the gate / up halves."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # two thirds of the MLP width, rounded up to a multiple of 8 (as in DINOv2's SwiGLUFFNFused)
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """Build from a transformers ``config.json`` dict. Keys this port does not use are ignored;
        the runtime options (``dtype`` included, which in ``config.json`` is the dtype the checkpoint
        was saved in) only come from ``overrides``."""
        kw = pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS)
        for key in ("image_size", "patch_size"):
            v = kw.get(key)
            if isinstance(v, list | tuple):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"Dinov2Config: only square {key} is supported, got {v}")
                kw[key] = int(v[0])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> Dinov2Config:
        return cls.from_dict(read_config_json(folder, what="transformers DINOv2 model folder"), **overrides)


# facebook/dinov2-{small,base,large,giant} (config.json); the "-with-registers-" checkpoints are the
# same with num_register_tokens=4.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_s14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_b14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit_l14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vit_g14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}


def preset(name: str, *, registers: bool = False, **overrides: Any) -> Dinov2Config:
    """``preset("vit_g14")`` etc.: the architecture of facebook/dinov2-giant (image_size 518,
    patch 14, mlp_ratio 4); ``registers=True`` gives the with-registers variant (4 registers)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown DINOv2 preset {name!r}; choose from {sorted(PRESETS)}")
    kw: dict[str, Any] = dict(mlp_ratio=4, image_size=518, patch_size=14, layer_norm_eps=1e-6,
                              layerscale_value=1.0, hidden_act="gelu", qkv_bias=True)
    kw.update(PRESETS[name])
    if registers:
        kw["num_register_tokens"] = 4
    kw.update(overrides)
    return Dinov2Config(**kw)
