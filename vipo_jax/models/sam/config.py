"""SAM image-encoder configuration, with the field names of transformers' ``SamVisionConfig`` (the
``vision_config`` of a ``SamModel`` ``config.json``) plus the runtime options of every port."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import RUNTIME_FIELDS, normalize_runtime, pick_fields, read_config_json

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish", "relu")
# SamLayerNorm's default epsilon, used by the neck's two channel norms (not layer_norm_eps).
NECK_LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    mlp_dim: int | None = None
    # runtime options (never read from config.json)
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", int(self.hidden_size * self.mlp_ratio))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"SamVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"SamVisionConfig: unsupported hidden_act {self.hidden_act!r}; "
                              f"supported: {list(ACTIVATIONS)}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"SamVisionConfig: image_size {self.image_size} < patch_size {self.patch_size}")
        if self.window_size < 0:
            raise ConfigError(f"SamVisionConfig: window_size must be >= 0, got {self.window_size}")
        normalize_runtime(self, "SamVisionConfig")

    # ---- derived architecture ------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size`` (64 for 1024 / 16; a remainder is dropped by the
        strided patch convolution, as in transformers)."""
        return self.image_size // self.patch_size

    def is_global(self, i: int) -> bool:
        """Whether layer ``i`` attends globally (window size 0 in transformers). As there, indexes
        in ``global_attn_indexes`` that name no layer are ignored."""
        return self.window_size == 0 or i in self.global_attn_indexes

    @property
    def windowed_indexes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.is_global(i))

    @property
    def global_indexes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_global(i))

    @property
    def layer_runs(self) -> tuple[tuple[bool, int], ...]:
        """The layer sequence as runs of (is_global, count), e.g. ViT-B: ((False, 2), (True, 1)) x 4."""
        runs: list[list] = []
        for i in range(self.num_hidden_layers):
            g = self.is_global(i)
            if runs and runs[-1][0] == g:
                runs[-1][1] += 1
            else:
                runs.append([g, 1])
        return tuple((g, n) for g, n in runs)

    def rel_pos_size(self, is_global: bool) -> int:
        """Rows of a layer's ``rel_pos_h`` / ``rel_pos_w`` table: 2 x (attended side) - 1."""
        side = self.grid if is_global else self.window_size
        return 2 * side - 1

    def feature_grid(self, size: int | Sequence[int] | None = None, *, neck: bool = True) -> tuple[int, int, int]:
        """(h, w, D) of the image embeddings: (64, 64, 256) for ViT-B at 1024 (the neck's output;
        ``neck=False``: the ViT tokens, D = hidden_size). The encoder only takes
        ``image_size x image_size`` inputs (its absolute and relative position tables are fixed), so
        ``size``, when given, must be that."""
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(hw) != (self.image_size, self.image_size):
                raise ConfigError(f"SAM takes {self.image_size}x{self.image_size} inputs only, got {size!r} "
                                  "(resize / pad with vipo_jax.models.sam.preprocess)")
        return self.grid, self.grid, self.output_channels if neck else self.hidden_size

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> SamVisionConfig:
        """Build from a transformers ``SamVisionConfig`` dict, or a ``SamConfig`` dict (its
        ``vision_config`` is used). Keys this port does not use are ignored; the runtime options
        only come from ``overrides``."""
        if isinstance(d.get("vision_config"), Mapping):
            d = d["vision_config"]
        kw = pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS)
        for key in ("image_size", "patch_size"):
            v = kw.get(key)
            if isinstance(v, list | tuple):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"SamVisionConfig: only square {key} is supported, got {v}")
                kw[key] = int(v[0])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> SamVisionConfig:
        return cls.from_dict(read_config_json(folder, what="transformers SAM model folder"), **overrides)

    def replace(self, **changes: Any) -> SamVisionConfig:
        return dataclasses.replace(self, **changes)


# facebook/sam-vit-{base,large,huge} (config.json "vision_config"): image 1024, patch 16, window 14,
# mlp_ratio 4, absolute + relative positions, qkv bias, 256 output channels.
PRESETS: dict[str, dict[str, Any]] = {
    "sam-vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         global_attn_indexes=(2, 5, 8, 11)),
    "sam-vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          global_attn_indexes=(5, 11, 17, 23)),
    "sam-vit-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                         global_attn_indexes=(7, 15, 23, 31)),
}


def preset(name: str, **overrides: Any) -> SamVisionConfig:
    """``preset("sam-vit-base")`` (also ``"facebook/sam-vit-base"``): the image encoder of that
    checkpoint, for building the model abstractly (``nnx.eval_shape``) at full size."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ConfigError(f"unknown SAM preset {name!r}; choose from {sorted(PRESETS)}")
    kw: dict[str, Any] = dict(output_channels=256, num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu",
                              layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4.0, use_abs_pos=True, use_rel_pos=True,
                              window_size=14)
    kw.update(PRESETS[key])
    return SamVisionConfig(**pick_fields(SamVisionConfig, kw, overrides))


def feature_grid(cfg: SamVisionConfig, size: int | Sequence[int] | None = None, *,
                 neck: bool = True) -> tuple[int, int, int]:
    """(h, w, D) of the image embeddings (see :meth:`SamVisionConfig.feature_grid`)."""
    return cfg.feature_grid(size, neck=neck)
