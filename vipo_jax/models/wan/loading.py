"""Loading a Wan2.1 DiT from a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError
from vipo_jax.models.wan.config import WanConfig
from vipo_jax.models.wan.convert import convert_diffusers
from vipo_jax.models.wan.model import WanTransformer
from vipo_jax.weights.loading import ShardingFn, abstract_model, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def transformer_folder(path: str | Path) -> Path:
    """The transformer folder of ``path``: itself, or a pipeline root's ``transformer/``."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path

def from_pretrained(path: str | Path, *, param_dtype: str | None = None, dtype: str | None = None,
                         sharding: ShardingFn | None = None, **overrides: Any) -> WanTransformer:
    """Load a Wan2.1 T2V DiT from a diffusers transformer folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors`` or its sharded ``.index.json``), a pipeline root holding
    ``transformer/``, or one ``.safetensors`` / ``.index.json`` file with ``config.json`` beside it.

    ``param_dtype`` / ``dtype`` and ``overrides`` (``remat``, ``attention``, ...) replace config
    fields. ``sharding(name, ShapeDtypeStruct)`` places each parameter as it is loaded."""
    path = transformer_folder(path)
    if path.is_dir():
        folder = path
        cfg = WanConfig.from_pretrained(folder, param_dtype=param_dtype, dtype=dtype, **overrides)
        try:
            tensors = open_checkpoint(folder, stem="diffusion_pytorch_model")
        except CheckpointError:
            tensors = open_checkpoint(folder)
    elif path.is_file():
        cfg = WanConfig.from_pretrained(path.parent, param_dtype=param_dtype, dtype=dtype, **overrides)
        tensors = open_checkpoint(path)
    else:
        raise CheckpointError(f"Wan transformer checkpoint not found: {path}")
    params = convert_diffusers(tensors, cfg, where=str(path))
    abstract = abstract_model(WanTransformer, cfg)
    return load_into(abstract, params, where=str(path), sharding=sharding)
