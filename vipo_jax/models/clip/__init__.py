"""CLIP in Flax NNX: the FLUX text encoder, and the image-text reward models (HPSv2.1 from an
open_clip checkpoint, PickScore / CLIP from transformers checkpoints)."""

from vipo_jax.models.clip.config import (
    OPEN_CLIP_CONFIGS,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    config_from_open_clip,
)
from vipo_jax.models.clip.convert import convert_hf, convert_open_clip
from vipo_jax.models.clip.loading import from_pretrained
from vipo_jax.models.clip.model import CLIPModel, l2_normalize
from vipo_jax.models.clip.text import CLIPTextModel
from vipo_jax.models.clip.vision import CLIPVisionModel

__all__ = [
    "from_pretrained",
    "OPEN_CLIP_CONFIGS",
    "CLIPConfig",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "config_from_open_clip",
    "convert_hf",
    "convert_open_clip",
    "l2_normalize",
]
