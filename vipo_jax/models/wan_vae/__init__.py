"""The Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) in Flax NNX, channels-last (B, F, H, W, C)."""

from vipo_jax.models.wan_vae.config import WAN21_VAE, WanVAEConfig
from vipo_jax.models.wan_vae.convert import convert_diffusers, plan_diffusers
from vipo_jax.models.wan_vae.loading import from_pretrained
from vipo_jax.models.wan_vae.model import (
    WanVAE,
    decode_to_unit,
    latents_to_model,
    model_to_latents,
)

__all__ = [
    "WAN21_VAE",
    "WanVAE",
    "WanVAEConfig",
    "convert_diffusers",
    "decode_to_unit",
    "from_pretrained",
    "latents_to_model",
    "model_to_latents",
    "plan_diffusers",
]
