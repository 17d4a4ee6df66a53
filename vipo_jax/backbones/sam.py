"""SAM's ViT image encoder as the PSM backbone (one of the paper's comparisons): the neck's image
embeddings (256 channels on a 64x64 grid for SAM's 1024x1024 input), the generation resized to the
encoder's input size."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from vipo_jax.backbones.registry import BackboneContext, BackboneEntry, LoadedBackbone, register
from vipo_jax.errors import CheckpointError
from vipo_jax.models.sam import SamVisionEncoder, from_pretrained, image_embeddings, preprocess, preset
from vipo_jax.weights.loading import init_model


def check(ctx: BackboneContext) -> None:
    path = str(ctx.config.psm.backbone or "")
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"SAM backbone folder not found: --config.psm.backbone={path!r}. Download a "
                              "transformers SamModel, e.g. `huggingface-cli download facebook/sam-vit-base "
                              "--local-dir /data/sam-vit-base` (the toy world has no SAM of its own either).")


def load(ctx: BackboneContext) -> LoadedBackbone:
    if ctx.source in ("toy", "pretrained"):
        check(ctx)
        model = from_pretrained(str(ctx.config.psm.backbone), dtype=ctx.dtype, sharding=ctx.sharding)
    else:
        model = init_model(SamVisionEncoder, preset("sam-vit-base", dtype=ctx.dtype), abstract=ctx.abstract)
    graphdef, params = nnx.split(model)
    size = model.config.image_size

    def features(params_, images):
        return image_embeddings(nnx.merge(graphdef, params_), preprocess(images, size))

    return LoadedBackbone(features=features, params=params)


register(BackboneEntry("sam", load, "SAM's ViT image encoder, neck embeddings (--config.psm.backbone=<SamModel "
                       "folder>)", check=check))
