"""FLUX.1 DiT (diffusers ``FluxTransformer2DModel``) in Flax NNX."""

from vipo_jax.models.flux.config import PRESETS, FluxConfig, preset
from vipo_jax.models.flux.convert import convert_bfl, convert_diffusers
from vipo_jax.models.flux.loading import from_pretrained
from vipo_jax.models.flux.model import FluxTransformer
from vipo_jax.models.flux.packing import latent_image_ids, pack_latents, text_ids, unpack_latents
from vipo_jax.models.flux.velocity import flux_velocity

__all__ = [
    "from_pretrained",
    "PRESETS",
    "FluxConfig",
    "FluxTransformer",
    "convert_bfl",
    "convert_diffusers",
    "flux_velocity",
    "latent_image_ids",
    "pack_latents",
    "preset",
    "text_ids",
    "unpack_latents",
]
