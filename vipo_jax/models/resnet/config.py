"""ResNet configuration, with the field names of transformers' ``ResNetConfig`` (``config.json``)
plus the runtime options of every port."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import RUNTIME_FIELDS, normalize_runtime, pick_fields, read_config_json

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish")
LAYER_TYPES = ("basic", "bottleneck")
# torch.nn.BatchNorm2d's default epsilon; transformers' ResNet never changes it (no config field).
BATCH_NORM_EPS = 1e-5
# the bottleneck's inner width is out_channels // BOTTLENECK_REDUCTION (transformers' ``reduction``)
BOTTLENECK_REDUCTION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    # runtime options (never read from config.json)
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if not self.depths or len(self.depths) != len(self.hidden_sizes):
            raise ConfigError(f"ResNetConfig: depths {self.depths} and hidden_sizes {self.hidden_sizes} must be "
                              "non-empty and of the same length (one entry per stage)")
        if min(self.depths) < 1:
            raise ConfigError(f"ResNetConfig: every stage needs at least one layer, got depths {self.depths}")
        if self.layer_type not in LAYER_TYPES:
            raise ConfigError(f"ResNetConfig: layer_type {self.layer_type!r} is not one of {LAYER_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"ResNetConfig: unsupported hidden_act {self.hidden_act!r}; "
                              f"supported: {list(ACTIVATIONS)}")
        if self.layer_type == "bottleneck" and any(h % BOTTLENECK_REDUCTION for h in self.hidden_sizes):
            raise ConfigError(f"ResNetConfig: bottleneck hidden_sizes {self.hidden_sizes} must be multiples of "
                              f"{BOTTLENECK_REDUCTION}")
        normalize_runtime(self, "ResNetConfig")

    # ---- derived architecture ------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """transformers' names: ``"stem"`` (after the max-pool), then ``"stage1"`` .. ``"stageN"``."""
        return ("stem",) + tuple(f"stage{i}" for i in range(1, self.num_stages + 1))

    def stage_index(self, stage: str | int | None) -> int:
        """0 for ``"stem"``, ``i`` for ``"stage<i>"`` (``None``: the last stage). Integers index
        :attr:`stage_names` (negative ones from the end), as transformers' ``hidden_states`` do."""
        n = len(self.stage_names)
        if stage is None:
            return n - 1
        if isinstance(stage, str):
            if stage not in self.stage_names:
                raise ConfigError(f"ResNet: unknown stage {stage!r}; choose from {list(self.stage_names)}")
            return self.stage_names.index(stage)
        i = int(stage)
        if not -n <= i < n:
            raise ConfigError(f"ResNet: stage index {stage} out of range for {n} feature maps {list(self.stage_names)}")
        return i % n

    def stage_channels(self, stage: str | int | None = None) -> int:
        i = self.stage_index(stage)
        return self.embedding_size if i == 0 else self.hidden_sizes[i - 1]

    def stage_stride(self, i: int) -> int:
        """Stride of the first layer of stage ``i`` (0-based): 1 for the first stage unless
        ``downsample_in_first_stage``, 2 for the others."""
        return 2 if (i > 0 or self.downsample_in_first_stage) else 1

    def feature_grid(self, size: int | Sequence[int], stage: str | int | None = None) -> tuple[int, int, int]:
        """(h, w, channels) of the feature map of ``stage`` for an input of ``size`` = H or (H, W):
        every stride-2 step (7x7 stem conv, 3x3 max-pool, each downsampling stage) maps n to
        ceil(n / 2), as torch's padded convolutions do."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or min(hw) < 1:
            raise ConfigError(f"ResNet.feature_grid: size must be a positive int or (H, W), got {size!r}")
        i = self.stage_index(stage)
        halvings = 2 + sum(self.stage_stride(s) == 2 for s in range(i))
        h, w = hw
        for _ in range(halvings):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w, self.stage_channels(i)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> ResNetConfig:
        """Build from a transformers ``config.json`` dict. Keys this port does not use (labels,
        ``out_features``...) are ignored; the runtime options (``dtype`` included, which in
        ``config.json`` is the dtype the checkpoint was saved in) only come from ``overrides``."""
        return cls(**pick_fields(cls, d, overrides, skip=RUNTIME_FIELDS))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> ResNetConfig:
        return cls.from_dict(read_config_json(folder, what="transformers ResNet model folder"), **overrides)

    def replace(self, **changes: Any) -> ResNetConfig:
        return dataclasses.replace(self, **changes)


# microsoft/resnet-{18,34,50,101,152} (config.json): embedding_size 64, relu, no downsampling in the
# first stage, stride in the 3x3 conv of the bottleneck (ResNet v1.5).
PRESETS: dict[str, dict[str, Any]] = {
    "resnet-18": dict(layer_type="basic", hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2)),
    "resnet-34": dict(layer_type="basic", hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 6, 3)),
    "resnet-50": dict(layer_type="bottleneck", hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3)),
    "resnet-101": dict(layer_type="bottleneck", hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 23, 3)),
    "resnet-152": dict(layer_type="bottleneck", hidden_sizes=(256, 512, 1024, 2048), depths=(3, 8, 36, 3)),
}


def preset(name: str, **overrides: Any) -> ResNetConfig:
    """``preset("resnet-50")`` (also ``"microsoft/resnet-50"``): the architecture of that checkpoint,
    for building the model abstractly (``nnx.eval_shape``) at full size; ``overrides`` are fields."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ConfigError(f"unknown ResNet preset {name!r}; choose from {sorted(PRESETS)}")
    kw: dict[str, Any] = dict(num_channels=3, embedding_size=64, hidden_act="relu",
                              downsample_in_first_stage=False, downsample_in_bottleneck=False)
    kw.update(PRESETS[key])
    return ResNetConfig(**pick_fields(ResNetConfig, kw, overrides))


def feature_grid(cfg: ResNetConfig, size: int | Sequence[int], stage: str | int | None = None) -> tuple[int, int, int]:
    """(h, w, channels) of ``stage``'s feature map for an input of ``size`` (see
    :meth:`ResNetConfig.feature_grid`)."""
    return cfg.feature_grid(size, stage)
