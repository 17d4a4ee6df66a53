"""Qwen2-VL (vision tower + Qwen2 language model) in Flax NNX: the base of VideoAlign's video reward."""

from vipo_jax.models.qwen2_vl.config import (
    PRESETS,
    Qwen2VLConfig,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
    preset,
)
from vipo_jax.models.qwen2_vl.convert import convert_hf, detect_layout, expected_shapes
from vipo_jax.models.qwen2_vl.loading import from_pretrained, load_params
from vipo_jax.models.qwen2_vl.model import Qwen2VLModel, scatter_video
from vipo_jax.models.qwen2_vl.text import Qwen2VLTextModel, mrope_position_ids
from vipo_jax.models.qwen2_vl.vision import Qwen2VLVisionModel, patch_positions

__all__ = [
    "PRESETS",
    "Qwen2VLConfig",
    "Qwen2VLModel",
    "Qwen2VLTextConfig",
    "Qwen2VLTextModel",
    "Qwen2VLVisionConfig",
    "Qwen2VLVisionModel",
    "convert_hf",
    "detect_layout",
    "expected_shapes",
    "from_pretrained",
    "load_params",
    "mrope_position_ids",
    "patch_positions",
    "preset",
    "scatter_video",
]
