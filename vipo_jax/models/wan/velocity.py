"""The Wan DiT as a velocity field with true classifier-free guidance.

Latents are channels-last ``(B, T, H, W, C)`` in the DiT's (normalised) latent space; the model's
timestep input is ``sigma * 1000``. With guidance, the conditional and the unconditional
(negative-prompt) halves run as ONE batch of 2B through the DiT, and
``v = v_uncond + g * (v_cond - v_uncond)`` is formed in float32, as the ViPO / DanceGRPO Wan scripts
do in rollout and in training. Rollout and training call this same function, so the importance
ratio before the first update is exactly 1 with guidance on too.

``uncond_grad=False`` (the default, as the official Wan script: its unconditional pass runs under
``no_grad`` during the policy update) stops the gradient through the unconditional half; the
forward value, and so the log-probability, is the same either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def wan_velocity(model, x: jax.Array, sigma: jax.Array, text: jax.Array, negative: jax.Array | None = None,
                 guidance: float | None = None, *, uncond_grad: bool = False,
                 timestep_floor: bool = False) -> jax.Array:
    """v(x, sigma) for latents ``x`` (B, T, H, W, C); ``text`` / ``negative`` (B, L, D) prompt
    states (zero-padded, no mask, as WanPipeline). ``guidance`` None: the conditional pass only
    (worlds pass None for a configured scale <= 1, as diffusers does). ``timestep_floor``: the DiT
    sees ``floor(1000 sigma)`` as the official ViPO Wan script feeds it."""
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32) * 1000.0, (b,))
    if timestep_floor:  # the official scripts' int(sigma * 1000)
        t = jnp.floor(t)
    if negative is None or guidance is None:
        return model(x, t, text).astype(jnp.float32)
    if negative.shape != text.shape:
        raise ValueError(f"negative prompt states {negative.shape} must match the prompt's {text.shape}")
    both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([text, negative]))
    v_cond, v_uncond = both[:b].astype(jnp.float32), both[b:].astype(jnp.float32)
    if not uncond_grad:
        v_uncond = jax.lax.stop_gradient(v_uncond)
    return v_uncond + jnp.asarray(guidance, jnp.float32) * (v_cond - v_uncond)
