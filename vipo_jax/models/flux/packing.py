"""Latent <-> token packing and position ids, in exactly diffusers ``FluxPipeline``'s order.

A (B, C, H, W) VAE latent becomes (B, H/2 * W/2, 4C) tokens: each token is a 2x2 patch, channels
ordered (c, dy, dx); tokens in row-major (y, x) order. Image position ids are (0, y, x) per token,
text ids are all zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latent height and width must be even, got {h}x{w}")


def pack_latents(z: jax.Array) -> jax.Array:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    _check_even(h, w)
    z = jnp.reshape(z, (b, c, h // 2, 2, w // 2, 2))
    z = jnp.transpose(z, (0, 2, 4, 1, 3, 5))
    return jnp.reshape(z, (b, (h // 2) * (w // 2), c * 4))


def unpack_latents(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w) with ``h, w`` the latent size (inverse of
    :func:`pack_latents`; diffusers ``_unpack_latents`` takes pixel sizes instead)."""
    b, n, c4 = tokens.shape
    _check_even(h, w)
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"cannot unpack tokens {tokens.shape} into a {h}x{w} latent")
    z = jnp.reshape(tokens, (b, h // 2, w // 2, c4 // 4, 2, 2))
    z = jnp.transpose(z, (0, 3, 1, 4, 2, 5))
    return jnp.reshape(z, (b, c4 // 4, h, w))


def latent_image_ids(h: int, w: int) -> jax.Array:
    """(h/2 * w/2, 3) float32 position ids ``(0, row, col)`` for an h x w latent (diffusers
    ``_prepare_latent_image_ids(batch, h // 2, w // 2, ...)``)."""
    _check_even(h, w)
    rows, cols = jnp.meshgrid(jnp.arange(h // 2), jnp.arange(w // 2), indexing="ij")
    ids = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).astype(jnp.float32)
    return ids.reshape(-1, 3)


def text_ids(n: int) -> jax.Array:
    """(n, 3) zero position ids for n text tokens."""
    return jnp.zeros((n, 3), jnp.float32)
