"""Model-free PSM backbones, the cheap baselines a learned backbone has to beat: ``pixels`` (the
image averaged over ``psm.patch`` x ``psm.patch`` pixel patches: an RGB grid) and ``latents`` (the
final clean latent averaged over ``psm.patch`` x ``psm.patch`` latent positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.backbones.registry import BackboneContext, BackboneEntry, LoadedBackbone, register
from vipo_jax.errors import ConfigError


def patch_average(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/patch, W/patch, C): the mean of each patch."""
    b, h, w, c = x.shape
    if h % patch or w % patch:
        raise ConfigError(f"--config.psm.patch={patch} must divide the grid {h}x{w}")
    return jnp.mean(jnp.asarray(x, jnp.float32).reshape(b, h // patch, patch, w // patch, patch, c), axis=(2, 4))


def _patch(ctx: BackboneContext, default: int) -> int:
    patch = ctx.config.psm.get("patch", 0)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
        raise ConfigError(f"--config.psm.patch={patch!r} must be an integer >= 0 (0: the backbone's default)")
    return patch or default


def _pixels(ctx: BackboneContext) -> LoadedBackbone:
    patch = _patch(ctx, 4)
    return LoadedBackbone(features=lambda params, images: patch_average(images, patch))


def _latents(ctx: BackboneContext) -> LoadedBackbone:
    patch = _patch(ctx, 1)
    return LoadedBackbone(features=lambda params, latents: patch_average(latents, patch))


register(BackboneEntry("pixels", _pixels, "the image averaged over psm.patch x psm.patch pixel patches (a baseline)"))
register(BackboneEntry("latents", _latents, "the clean latent averaged over psm.patch x psm.patch positions "
                       "(a baseline)", reads="latents"))
