"""Loader: a transformers ResNet folder (``config.json`` + ``model.safetensors``) -> :class:`ResNetModel`,
strictly (no random initialisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.models.resnet.config import ResNetConfig
from vipo_jax.models.resnet.convert import convert_hf
from vipo_jax.models.resnet.model import ResNetModel
from vipo_jax.weights.loading import ShardingFn, SourceKeys, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(path: str | Path, *, param_dtype: Any = None, dtype: Any = None,
                sharding: ShardingFn | None = None, **overrides: Any) -> ResNetModel:
    """Load a transformers ``ResNetModel`` / ``ResNetBackbone`` / ``ResNetForImageClassification``
    folder, e.g. a snapshot of microsoft/resnet-50 (the classifier head is dropped). ``overrides``
    are :class:`ResNetConfig` fields (``remat``...)."""
    path = Path(path)
    overrides = dtype_overrides(overrides, param_dtype, dtype)
    cfg = ResNetConfig.from_pretrained(path, **overrides)
    abstract = abstract_model(ResNetModel, cfg)
    params = convert_hf(SourceKeys(open_checkpoint(path, stem="model"), where=str(path)), cfg)
    return load_into(abstract, params, where=str(path), sharding=sharding)


