"""Loader: a transformers Qwen2-VL folder (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``, e.g. a snapshot of Qwen/Qwen2-VL-2B-Instruct) -> :class:`Qwen2VLModel`,
strictly (every parameter from the checkpoint, no unexpected keys)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.qwen2_vl.config import Qwen2VLConfig
from vipo_jax.models.qwen2_vl.convert import convert_hf
from vipo_jax.models.qwen2_vl.model import Qwen2VLModel
from vipo_jax.weights.loading import ShardingFn, SourceKeys, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def open_weights(folder: Path) -> Mapping[str, np.ndarray]:
    """The checkpoint of a transformers folder: ``model.safetensors[.index.json]``, else its only
    safetensors file."""
    if not folder.is_dir():
        raise CheckpointError(f"Qwen2-VL folder not found: {folder}")
    has_model = any((folder / f"model{s}").is_file() for s in (".safetensors", ".safetensors.index.json"))
    return open_checkpoint(folder, "model" if has_model else None)


def load_params(cfg: Qwen2VLConfig, tensors: Mapping[str, np.ndarray], *, where: str,
                sharding: ShardingFn | None = None) -> Qwen2VLModel:
    """Convert a transformers state dict (mapping) and load it into a :class:`Qwen2VLModel` for ``cfg``."""
    params = convert_hf(SourceKeys(tensors, where=where), cfg)
    return load_into(abstract_model(Qwen2VLModel, cfg), params, where=where, sharding=sharding)


def from_pretrained(path: str | Path, *, param_dtype: Any = None, dtype: Any = None,
                  sharding: ShardingFn | None = None, **overrides: Any) -> Qwen2VLModel:
    """Load a transformers Qwen2-VL folder. ``overrides``: :class:`Qwen2VLConfig` fields (runtime
    options such as ``remat`` / ``attention``, or ``text_config={...}`` / ``vision_config={...}``)."""
    folder = Path(path)
    cfg = Qwen2VLConfig.from_pretrained(folder, **dtype_overrides(overrides, param_dtype, dtype))
    return load_params(cfg, open_weights(folder), where=str(folder), sharding=sharding)


