"""Rewards that live in a region of the image: the redness of the subject's pixels, or of the
background's. With a global reward the map cannot change *what* is learned in the toy world (its
DiT spreads any colour update over the whole image); a reward that lives on the subject or on the
background is what can show whether credit assigned by the PSM map goes where the reward is.

The subject mask comes from the generated image itself: the background colour is the per-channel
median of a border ring (``BORDER_FRACTION`` of the side, 4 px at 64x64), and a pixel belongs to the
subject when its RGB distance to that colour exceeds ``SUBJECT_THRESHOLD`` (0.35, about a third of
the distance between two palette colours). A uniform image (everything the background's colour:
the collapse of a digit painted over) has no subject, so ``subject_redness`` scores it 0 and
cannot be gamed by painting everything red; ``background_redness`` of an image with no background
pixels is 0 too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register

#: Border ring width as a fraction of the image side (4 px at 64x64).
BORDER_FRACTION = 1.0 / 16.0
#: RGB distance from the background colour above which a pixel is the subject's.
SUBJECT_THRESHOLD = 0.35


def background_color(images01: jax.Array, border_fraction: float = BORDER_FRACTION) -> jax.Array:
    """(B, H, W, 3) -> (B, 3): the per-channel median of the border ring."""
    x = jnp.asarray(images01, jnp.float32)
    b, h, w, _ = x.shape
    k = max(1, int(round(border_fraction * min(h, w))))
    ring = jnp.concatenate([x[:, :k].reshape(b, -1, 3), x[:, -k:].reshape(b, -1, 3),
                            x[:, k:-k, :k].reshape(b, -1, 3), x[:, k:-k, -k:].reshape(b, -1, 3)], axis=1)
    return jnp.median(ring, axis=1)


def subject_mask(images01: jax.Array, threshold: float = SUBJECT_THRESHOLD,
                 border_fraction: float = BORDER_FRACTION) -> jax.Array:
    """(B, H, W, 3) -> (B, H, W) float32 in {0, 1}: 1 where a pixel is farther than ``threshold``
    (RGB distance) from the border's median colour."""
    x = jnp.asarray(images01, jnp.float32)
    bg = background_color(x, border_fraction)
    dist = jnp.sqrt(jnp.sum((x - bg[:, None, None, :]) ** 2, axis=-1))
    return (dist > threshold).astype(jnp.float32)


def _masked_redness(images01: jax.Array, mask: jax.Array) -> jax.Array:
    x = jnp.asarray(images01, jnp.float32)
    red = x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])
    n = jnp.sum(mask, axis=(-2, -1))
    return jnp.where(n > 0, jnp.sum(red * mask, axis=(-2, -1)) / jnp.maximum(n, 1.0), 0.0)


def subject_redness(images01: jax.Array) -> jax.Array:
    """(B,) mean R - (G+B)/2 over the subject's pixels (0 without any)."""
    return _masked_redness(images01, subject_mask(images01))


def background_redness(images01: jax.Array) -> jax.Array:
    """(B,) mean R - (G+B)/2 over the background's pixels (0 without any)."""
    return _masked_redness(images01, 1.0 - subject_mask(images01))


def subject_fraction(images01: jax.Array) -> jax.Array:
    """(B,) the share of the image the subject covers."""
    return jnp.mean(subject_mask(images01), axis=(-2, -1))


def _entry(fn):
    def load(ctx: RewardContext) -> LoadedReward:
        return LoadedReward(score=lambda params, images, batch: fn(images))

    return load


register(RewardEntry("subject_redness", _entry(subject_redness),
                     "R - (G+B)/2 over the subject's pixels (farther than 0.35 from the border's median colour)",
                     monitor=True))
register(RewardEntry("background_redness", _entry(background_redness),
                     "R - (G+B)/2 over the background's pixels (within 0.35 of the border's median colour)",
                     monitor=True))
register(RewardEntry("subject_fraction", _entry(subject_fraction),
                     "the share of the image the subject covers (0 when a digit is painted over)",
                     trainable=False, monitor=True))

__all__ = ["BORDER_FRACTION", "SUBJECT_THRESHOLD", "background_color", "background_redness", "subject_fraction",
           "subject_mask", "subject_redness"]
