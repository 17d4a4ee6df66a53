"""Loading a transformers T5 / UMT5 encoder folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.models.t5.config import T5Config
from vipo_jax.models.t5.convert import convert_hf
from vipo_jax.models.t5.model import T5Encoder
from vipo_jax.weights.loading import ShardingFn, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(folder: str | Path, *, param_dtype: Any = None, dtype: Any = None,
                    sharding: ShardingFn | None = None, **overrides: Any) -> T5Encoder:
    """Load a transformers T5 / UMT5 encoder folder (``config.json`` + ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``). Full encoder-decoder checkpoints load too (the
    decoder is skipped). ``overrides`` set :class:`T5Config` runtime fields (``remat``, ``attention``)."""
    folder = Path(folder)
    overrides = dtype_overrides(overrides, param_dtype, dtype, what='T5')
    cfg = T5Config.from_pretrained(folder, **overrides)
    abstract = abstract_model(T5Encoder, cfg)
    has_model = any(folder.glob("model.safetensors*"))  # transformers' name; else the only checkpoint
    tensors = open_checkpoint(folder, "model" if has_model else None)
    params = convert_hf(tensors, cfg, where=str(folder))
    return load_into(abstract, params, where=str(folder), sharding=sharding)
