"""The FLUX.1 / SD KL autoencoder (diffusers ``AutoencoderKL``) in Flax NNX, NHWC."""

from vipo_jax.models.vae.config import FLUX1_VAE, AutoencoderKLConfig
from vipo_jax.models.vae.convert import convert_bfl_ae, convert_diffusers
from vipo_jax.models.vae.loading import from_pretrained
from vipo_jax.models.vae.model import (
    AutoencoderKL,
    decode_to_unit,
    latents_to_model,
    model_to_latents,
)

__all__ = [
    "FLUX1_VAE",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "convert_bfl_ae",
    "convert_diffusers",
    "decode_to_unit",
    "from_pretrained",
    "latents_to_model",
    "model_to_latents",
]
