"""DINOv2 as the PSM backbone (the paper's default, ViT-L/14): the last layer's layer-normed patch
tokens of the image resized to a multiple of the patch size, ImageNet-normalised.

Two switches reproduce the official ViPO code's input instead: ``psm.backbone_input=crop_uint8``
(the image truncated to uint8 levels, ``(x * 255).astype(uint8)``, not resized: the patch
convolution drops the right / bottom remainder, 512 px -> 36 x 36 patches where we resize to 518
px -> 37 x 37) and ``psm.rescale_rule=if_negative`` (the decoder's [-1, 1] output mapped to [0, 1]
only when its minimum is below 0, otherwise read as it is)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.backbones.registry import BackboneContext, BackboneEntry, LoadedBackbone, register
from vipo_jax.errors import CheckpointError
from vipo_jax.models.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dinov2Config,
    Dinov2Model,
    from_pretrained,
    patch_tokens,
    preprocess,
    preset,
)
from vipo_jax.weights.loading import init_model
from vipo_jax.weights.native import load_native


def official_rescale(images01: jax.Array) -> jax.Array:
    """The official code's ``if x.min() < 0: x = (x + 1) / 2`` on the decoder's [-1, 1] output x, given
    our [0, 1] images u = (x + 1) / 2: per image, u where min(x) < 0, else clip(x) = clip(2u - 1)."""
    u = jnp.asarray(images01, jnp.float32)
    negative = jnp.min(u, axis=tuple(range(1, u.ndim)), keepdims=True) < 0.5
    return jnp.where(negative, u, jnp.clip(2.0 * u - 1.0, 0.0, 1.0))


def official_pixels(images01: jax.Array, patch: int) -> jax.Array:
    """The official DINOv2 input: ``(x * 255).astype(uint8)`` levels, no resize, the right / bottom
    remainder of the patch grid dropped (what its patch convolution does), ImageNet-normalised."""
    x = jnp.floor(jnp.clip(jnp.asarray(images01, jnp.float32), 0.0, 1.0) * 255.0) / 255.0
    h, w = (x.shape[1] // patch) * patch, (x.shape[2] // patch) * patch
    x = x[:, :h, :w]
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def check(ctx: BackboneContext) -> None:
    if ctx.source == "toy":  # the toy assets hold a DINOv2
        return
    path = str(ctx.config.psm.backbone or "")
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"DINOv2 backbone folder not found: --config.psm.backbone={path!r}. Download "
                              "facebook/dinov2-large (or disable the PSM with --config.psm.enabled=False).")


def load(ctx: BackboneContext) -> LoadedBackbone:
    c = ctx.config
    if ctx.source == "toy":
        model = load_native(Path(ctx.toy_assets) / "dinov2", "dinov2", Dinov2Config, Dinov2Model)
    elif ctx.source == "pretrained":
        check(ctx)
        model = from_pretrained(str(c.psm.backbone), dtype=ctx.dtype, sharding=ctx.sharding)
    else:
        model = init_model(Dinov2Model, preset("vit_l14", dtype=ctx.dtype, attention=c.model.attention),
                           abstract=ctx.abstract)
    graphdef, params = nnx.split(model)
    patch = model.config.patch_size
    crop = str(c.psm.get("backbone_input", "resize")) == "crop_uint8"
    if_negative = str(c.psm.get("rescale_rule", "always")) == "if_negative"

    def features(p, images):
        if if_negative:
            images = official_rescale(images)
        if crop:
            return patch_tokens(nnx.merge(graphdef, p), official_pixels(images, patch))[0]
        return patch_tokens(nnx.merge(graphdef, p), preprocess(images, images.shape[1:3], patch_size=patch))[0]

    return LoadedBackbone(features=features, params=params)


register(BackboneEntry("dinov2", load, "DINOv2 patch tokens (--config.psm.backbone=<facebook/dinov2-large folder>)",
                       check=check))
