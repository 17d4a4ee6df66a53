"""Loader: a transformers SAM folder (``config.json`` + ``model.safetensors``) -> :class:`SamVisionEncoder`,
strictly (no random initialisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.models.sam.config import SamVisionConfig
from vipo_jax.models.sam.convert import convert_hf
from vipo_jax.models.sam.model import SamVisionEncoder
from vipo_jax.weights.loading import ShardingFn, SourceKeys, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(path: str | Path, *, param_dtype: Any = None, dtype: Any = None,
             sharding: ShardingFn | None = None, **overrides: Any) -> SamVisionEncoder:
    """Load the image encoder of a transformers ``SamModel`` folder (e.g. a snapshot of
    facebook/sam-vit-base; prompt encoder and mask decoder are skipped) or of a ``SamVisionModel``
    folder. ``overrides`` are :class:`SamVisionConfig` fields (``remat``, ``attention``...)."""
    path = Path(path)
    overrides = dtype_overrides(overrides, param_dtype, dtype)
    cfg = SamVisionConfig.from_pretrained(path, **overrides)
    abstract = abstract_model(SamVisionEncoder, cfg)
    params = convert_hf(SourceKeys(open_checkpoint(path, stem="model"), where=str(path)), cfg)
    return load_into(abstract, params, where=str(path), sharding=sharding)


