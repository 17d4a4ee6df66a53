"""BLIP in Flax NNX: the ViT image encoder and the BERT text encoder with cross-attention (reusable
towers), and ImageReward (THUDM/ImageReward v1.0) built from them."""

from vipo_jax.models.blip.config import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    BlipTextConfig,
    BlipVisionConfig,
    ImageRewardConfig,
)
from vipo_jax.models.blip.convert import (
    convert_blip_text,
    convert_blip_vision,
    convert_image_reward,
    convert_image_reward_checkpoint,
)
from vipo_jax.models.blip.loading import from_pretrained
from vipo_jax.models.blip.model import ImageRewardModel
from vipo_jax.models.blip.text import BlipTextModel
from vipo_jax.models.blip.vision import BlipVisionModel

__all__ = [
    "from_pretrained",
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "BlipTextConfig",
    "BlipTextModel",
    "BlipVisionConfig",
    "BlipVisionModel",
    "ImageRewardConfig",
    "ImageRewardModel",
    "convert_blip_text",
    "convert_blip_vision",
    "convert_image_reward",
    "convert_image_reward_checkpoint",
]
