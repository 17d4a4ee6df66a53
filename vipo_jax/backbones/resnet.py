"""ResNet as the PSM backbone (one of the paper's comparisons): the feature map of a named stage
(``--config.psm.backbone_layer``, default ``stage3``: 1024 channels at 1/16 of the input) of the
whole image, ImageNet-normalised, at its own size (``--config.psm.backbone_size`` resizes it)."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from vipo_jax.backbones.registry import BackboneContext, BackboneEntry, LoadedBackbone, register
from vipo_jax.errors import CheckpointError
from vipo_jax.models.resnet import ResNetModel, from_pretrained, preprocess, preset, stage_features
from vipo_jax.weights.loading import init_model

DEFAULT_STAGE = "stage3"


def check(ctx: BackboneContext) -> None:
    path = str(ctx.config.psm.backbone or "")
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"ResNet backbone folder not found: --config.psm.backbone={path!r}. Download a "
                              "transformers ResNet, e.g. `huggingface-cli download microsoft/resnet-50 --local-dir "
                              "/data/resnet-50` (the toy world has no ResNet of its own either).")


def load(ctx: BackboneContext) -> LoadedBackbone:
    p = ctx.config.psm
    if ctx.source in ("toy", "pretrained"):
        check(ctx)
        model = from_pretrained(str(p.backbone), dtype=ctx.dtype, sharding=ctx.sharding)
    else:
        model = init_model(ResNetModel, preset("resnet-50", dtype=ctx.dtype), abstract=ctx.abstract)
    graphdef, params = nnx.split(model)
    stage = str(p.get("backbone_layer", "") or DEFAULT_STAGE)
    size = int(p.get("backbone_size", 0) or 0) or None
    model.config.stage_index(stage)  # a bad name fails now, not inside the step

    def features(params_, images):
        return stage_features(nnx.merge(graphdef, params_), preprocess(images, size), stage)

    return LoadedBackbone(features=features, params=params)


register(BackboneEntry("resnet", load, "a transformers ResNet's stage feature map (--config.psm.backbone=<folder>, "
                       "--config.psm.backbone_layer=stage3)", check=check))
