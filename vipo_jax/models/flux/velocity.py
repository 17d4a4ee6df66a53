"""The Flux DiT as a velocity field over unpacked latents (B, H, W, C): the RL code and the loss
see latent positions, the 2x2 token packing stays inside this adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.models.flux.packing import latent_image_ids, pack_latents, text_ids, unpack_latents


def flux_velocity(model, x: jax.Array, sigma: jax.Array, t5: jax.Array, pooled: jax.Array,
                  guidance: jax.Array | None, *, timestep_floor: bool = False) -> jax.Array:
    """v(x, sigma) for latents ``x`` (B, H, W, C) in the model's (scaled) latent space.
    ``timestep_floor``: the DiT sees ``floor(1000 sigma) / 1000`` as the official ViPO / DanceGRPO
    scripts feed it (``int(sigma * 1000)``), while the SDE keeps the exact sigma."""
    b, h, w, _ = x.shape
    tokens = pack_latents(jnp.transpose(x, (0, 3, 1, 2)))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
    if timestep_floor:
        sigma = jnp.floor(sigma * 1000.0) / 1000.0
    if guidance is not None:
        guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
    v = model(tokens, t5, pooled, sigma, latent_image_ids(h, w), text_ids(t5.shape[1]), guidance=guidance)
    return jnp.transpose(unpack_latents(v.astype(jnp.float32), h, w), (0, 2, 3, 1))
