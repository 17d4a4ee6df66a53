"""Loading a transformers DINOv2 folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.models.dinov2.config import Dinov2Config
from vipo_jax.models.dinov2.convert import _strip_prefix, convert_hf
from vipo_jax.models.dinov2.model import Dinov2Model
from vipo_jax.weights.loading import ShardingFn, SourceKeys, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(path: str | Path, *, param_dtype: Any = None, dtype: Any = None,
                sharding: ShardingFn | None = None, **overrides: Any) -> Dinov2Model:
    """Load a transformers DINOv2 folder (``config.json`` + ``model.safetensors``), e.g. a
    snapshot of facebook/dinov2-base or facebook/dinov2-with-registers-base."""
    path = Path(path)
    overrides = dtype_overrides(overrides, param_dtype, dtype)
    cfg = Dinov2Config.from_pretrained(path, **overrides)
    abstract = abstract_model(Dinov2Model, cfg)
    tensors = _strip_prefix(open_checkpoint(path, stem="model"))
    params = convert_hf(SourceKeys(tensors, where=str(path)), cfg)
    return load_into(abstract, params, where=str(path), sharding=sharding)
