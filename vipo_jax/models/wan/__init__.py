"""Wan2.1 text-to-video DiT (diffusers ``WanTransformer3DModel``) in Flax NNX.

Latents are channels-last ``(B, F, H, W, C)``, like the Wan VAE port; see ``transformer.py``."""

from vipo_jax.models.wan.config import PRESETS, WanConfig, preset
from vipo_jax.models.wan.convert import convert_diffusers
from vipo_jax.models.wan.loading import from_pretrained
from vipo_jax.models.wan.model import WanTransformer
from vipo_jax.models.wan.velocity import wan_velocity

__all__ = [
    "from_pretrained",
    "PRESETS",
    "WanConfig",
    "WanTransformer",
    "convert_diffusers",
    "preset",
    "wan_velocity",
]
