"""Wan2.1 text-to-video DiT (diffusers ``WanTransformer3DModel``) in Flax NNX.

Latents are channels-last ``(B, F, H, W, C)``, like the Wan VAE port; see ``transformer.py``."""

from vipo_jax.models.wan.config import PRESETS, WanConfig, preset
from vipo_jax.models.wan.convert import convert_diffusers, load_wan_transformer
from vipo_jax.models.wan.transformer import WanTransformer
from vipo_jax.models.wan.velocity import wan_velocity

__all__ = [
    "PRESETS",
    "WanConfig",
    "WanTransformer",
    "convert_diffusers",
    "load_wan_transformer",
    "preset",
    "wan_velocity",
]
