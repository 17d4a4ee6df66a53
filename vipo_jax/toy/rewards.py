"""Toy-world rewards and metrics over images in [0, 1], layout (B, H, W, 3), in jax.numpy.

- `redness`: mean over pixels of R - (G + B) / 2, per image. Pure red scores 1, pure blue or green
  -0.5, any grey 0. The RL reward of the toy experiments.
- `color_match`: whether an image's dominant foreground / background colors are the prompted ones.
  Background color = per-channel median of the border pixels (a 4-pixel ring at 64x64; the
  digits keep a margin); foreground color = mean of the 10% of pixels farthest (Euclidean RGB)
  from that background color, i.e. the stroke interiors. Each is snapped to the nearest palette
  color (`vipo_jax.toy.digits.PALETTE`); the score is (fg correct + bg correct) / 2, in {0, .5, 1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.toy.digits import PALETTE_RGB

#: Border ring width as a fraction of the image side (4 px at 64).
BORDER_FRACTION = 1.0 / 16.0
#: Fraction of pixels (farthest from the background color) averaged for the foreground color.
FG_FRACTION = 0.10


@jax.jit
def redness(images01: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B,) mean of R - (G + B) / 2 (float32)."""
    x = jnp.asarray(images01, jnp.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return jnp.mean(r - 0.5 * (g + b), axis=(-2, -1))


def _nearest_palette(rgb: jax.Array) -> jax.Array:
    pal = jnp.asarray(PALETTE_RGB)
    d = jnp.sum((rgb[..., None, :] - pal) ** 2, axis=-1)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


@jax.jit
def dominant_colors(images01: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(B, H, W, 3) -> (fg_idx, bg_idx, fg_rgb, bg_rgb): estimated palette indices (B,) int32 and
    the raw estimated colors (B, 3), as defined in the module docstring."""
    x = jnp.asarray(images01, jnp.float32)
    b, h, w, _ = x.shape
    k = max(1, int(round(BORDER_FRACTION * min(h, w))))
    border = jnp.concatenate([
        x[:, :k].reshape(b, -1, 3), x[:, -k:].reshape(b, -1, 3),
        x[:, k:-k, :k].reshape(b, -1, 3), x[:, k:-k, -k:].reshape(b, -1, 3)], axis=1)
    bg_rgb = jnp.median(border, axis=1)
    flat = x.reshape(b, h * w, 3)
    dist = jnp.sum((flat - bg_rgb[:, None, :]) ** 2, axis=-1)
    n_fg = max(1, int(round(FG_FRACTION * h * w)))
    _, idx = jax.lax.top_k(dist, n_fg)
    fg_rgb = jnp.mean(jnp.take_along_axis(flat, idx[..., None], axis=1), axis=1)
    return _nearest_palette(fg_rgb), _nearest_palette(bg_rgb), fg_rgb, bg_rgb


@jax.jit
def color_match(images01: jax.Array, fg_idx: jax.Array, bg_idx: jax.Array) -> jax.Array:
    """(B,) float32 in {0, 0.5, 1}: half a point for the foreground color being the prompted palette
    index `fg_idx` (B,), half for the background being `bg_idx` (B,)."""
    fg_hat, bg_hat, _, _ = dominant_colors(images01)
    fg_ok = (fg_hat == jnp.asarray(fg_idx)).astype(jnp.float32)
    bg_ok = (bg_hat == jnp.asarray(bg_idx)).astype(jnp.float32)
    return 0.5 * (fg_ok + bg_ok)
