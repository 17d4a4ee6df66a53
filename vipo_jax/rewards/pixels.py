"""Rewards computed from the pixels alone (no model): ``redness``, the paper's toy reward
``R - (G + B) / 2`` averaged over the pixels (a clip: over frames and pixels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register


def redness(images01: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B,) mean of R - (G + B) / 2 (float32). Pure red scores 1, pure blue or green
    -0.5, any grey 0."""
    x = jnp.asarray(images01, jnp.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return jnp.mean(r - 0.5 * (g + b), axis=(-2, -1))


def redness_video(videos01: jax.Array) -> jax.Array:
    """(B, T, H, W, 3) -> (B,) mean over frames and pixels of R - (G + B) / 2."""
    x = jnp.asarray(videos01, jnp.float32)
    return jnp.mean(x[..., 0] - 0.5 * (x[..., 1] + x[..., 2]), axis=(1, 2, 3))


def _load_redness(ctx: RewardContext) -> LoadedReward:
    return LoadedReward(score=lambda params, images, batch: redness(images),
                        video_score=lambda params, videos, batch: redness_video(videos))


register(RewardEntry("redness", _load_redness, "R - (G+B)/2 averaged over the pixels (the paper's toy reward)",
                     monitor=True))
