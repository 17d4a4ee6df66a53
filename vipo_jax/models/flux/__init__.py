"""FLUX.1 DiT (diffusers ``FluxTransformer2DModel``) in Flax NNX."""

from vipo_jax.models.flux.config import PRESETS, FluxConfig, preset
from vipo_jax.models.flux.convert import convert_bfl, convert_diffusers, load_flux_transformer
from vipo_jax.models.flux.dit import FluxTransformer
from vipo_jax.models.flux.packing import latent_image_ids, pack_latents, text_ids, unpack_latents
from vipo_jax.models.flux.velocity import flux_velocity

__all__ = [
    "PRESETS",
    "FluxConfig",
    "FluxTransformer",
    "convert_bfl",
    "convert_diffusers",
    "flux_velocity",
    "latent_image_ids",
    "load_flux_transformer",
    "pack_latents",
    "preset",
    "text_ids",
    "unpack_latents",
]
