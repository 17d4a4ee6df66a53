"""ResNet (transformers ``ResNetModel``, e.g. microsoft/resnet-50) feature extractor in Flax NNX:
a PSM backbone alternative to DINOv2."""

from vipo_jax.models.resnet.config import PRESETS, ResNetConfig, feature_grid, preset
from vipo_jax.models.resnet.convert import convert_hf, expected_shapes
from vipo_jax.models.resnet.loading import from_pretrained
from vipo_jax.models.resnet.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenBatchNorm,
    ResNetModel,
    preprocess,
    stage_features,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "FrozenBatchNorm",
    "ResNetConfig",
    "ResNetModel",
    "convert_hf",
    "expected_shapes",
    "feature_grid",
    "from_pretrained",
    "preprocess",
    "preset",
    "stage_features",
]
