"""The randomness of the GRPO recipe outside the sampler: shared initial noise per group, which
transitions each sample trains, and picking those transitions out of a rollout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError


def gather_transitions(latents: jax.Array, log_probs: jax.Array, sigmas: jax.Array,
                       timesteps: jax.Array) -> dict[str, jax.Array]:
    """Pick each sample's trained transitions from a rollout, K-major for a scan over K.

    ``latents`` (S+1, B, ...), ``log_probs`` (S, B, ...), ``timesteps`` (B, K) int. Returns
    ``x``, ``x_next`` (K, B, ...), ``log_probs`` (K, B, ...), ``sigma``, ``sigma_next`` (K, B)."""
    t = jnp.asarray(timesteps, jnp.int32).T  # (K, B)
    b = jnp.arange(t.shape[1])[None, :]
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return {
        "x": latents[t, b],
        "x_next": latents[t + 1, b],
        "log_probs": log_probs[t, b],
        "sigma": sigmas[t],
        "sigma_next": sigmas[t + 1],
    }


def initial_noise(key: jax.Array, num_prompts: int, group_size: int,
                  shape: tuple[int, ...]) -> jax.Array:
    """``(num_prompts*group_size, *shape)`` float32 noise shared within each group.

    Prompt-major: sample ``b`` belongs to group ``b // group_size``; all G samples of a prompt start
    from the same noise (``init_same_noise``), so their reward differences come from the SDE
    noise only, which lowers the variance of the group-relative advantage."""
    noise = jax.random.normal(key, (int(num_prompts), *tuple(shape)), jnp.float32)
    return jnp.repeat(noise, int(group_size), axis=0)


def num_train_timesteps(num_steps: int, fraction: float) -> int:
    """``int((S-1)*fraction)``, the number of trained transitions per sample (Python arithmetic,
    as in DanceGRPO: 8 steps, 0.6 -> 4; 16 steps -> 9)."""
    k = int((int(num_steps) - 1) * float(fraction))
    if k < 1 or k > int(num_steps) - 1:
        raise ConfigError(
            f"timestep_fraction={fraction} with {num_steps} sampling steps trains {k} of the "
            f"{int(num_steps) - 1} trainable transitions; need between 1 and {int(num_steps) - 1}")
    return k


def sample_train_timesteps(key: jax.Array, batch: int, num_steps: int, fraction: float) -> jax.Array:
    """``(B, K)`` int32: for each sample independently, K distinct transitions among the first
    ``S-1`` (the last, sigma->0, is never trained), in random order (a per-sample random
    permutation truncated to K, as DanceGRPO's ``randperm(S-1)[:K]``)."""
    k = num_train_timesteps(num_steps, fraction)
    u = jax.random.uniform(key, (int(batch), int(num_steps) - 1))
    return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)
