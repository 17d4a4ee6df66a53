"""SAM's ViT image encoder (transformers ``SamModel.vision_encoder``, e.g. facebook/sam-vit-base)
in Flax NNX: a PSM backbone alternative to DINOv2."""

from vipo_jax.models.sam.config import PRESETS, SamVisionConfig, feature_grid, preset
from vipo_jax.models.sam.convert import convert_hf, expected_shapes
from vipo_jax.models.sam.loading import from_pretrained
from vipo_jax.models.sam.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SamVisionEncoder,
    image_embeddings,
    preprocess,
    preprocess_size,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "SamVisionConfig",
    "SamVisionEncoder",
    "convert_hf",
    "expected_shapes",
    "feature_grid",
    "from_pretrained",
    "image_embeddings",
    "preprocess",
    "preprocess_size",
    "preset",
]
