"""DINOv2 as the PSM backbone (the paper's default, ViT-L/14): the last layer's layer-normed patch
tokens of the image resized to a multiple of the patch size, ImageNet-normalised."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from vipo_jax.backbones.registry import BackboneContext, BackboneEntry, LoadedBackbone, register
from vipo_jax.errors import CheckpointError
from vipo_jax.models.dinov2 import Dinov2Config, Dinov2Model, from_pretrained, patch_tokens, preprocess, preset
from vipo_jax.weights.loading import init_model
from vipo_jax.weights.native import load_native


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

    def features(p, images):
        return patch_tokens(nnx.merge(graphdef, p), preprocess(images, images.shape[1:3], patch_size=patch))[0]

    return LoadedBackbone(features=features, params=params)


register(BackboneEntry("dinov2", load, "DINOv2 patch tokens (--config.psm.backbone=<facebook/dinov2-large folder>)",
                       check=check))
