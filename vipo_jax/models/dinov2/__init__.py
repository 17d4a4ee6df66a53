"""DINOv2 (and DINOv2 with registers) ViT feature extractor in Flax NNX."""

from vipo_jax.models.dinov2.config import PRESETS, Dinov2Config, preset
from vipo_jax.models.dinov2.convert import convert_hf
from vipo_jax.models.dinov2.loading import from_pretrained
from vipo_jax.models.dinov2.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dinov2Model,
    patch_tokens,
    preprocess,
    resize_bicubic_torch,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Dinov2Config",
    "Dinov2Model",
    "convert_hf",
    "from_pretrained",
    "patch_tokens",
    "preprocess",
    "preset",
    "resize_bicubic_torch",
]
