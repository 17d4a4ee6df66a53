"""vipo_jax's own checkpoint layout: ``config.json`` (the model's config dataclass) plus
``model.safetensors`` keyed by dotted nnx parameter paths. Used for the toy world and for exported
fine-tuned weights; loading goes through the same strict :func:`load_into` as real checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.weights.loading import ShardingFn, abstract_model, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


def save_native(model: nnx.Module, folder: str | os.PathLike, config: Any, kind: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    (folder / "config.json").write_text(json.dumps({"vipo_kind": kind, **cfg}, indent=1))
    _, state = nnx.split(model)
    tensors = {".".join(str(p) for p in path): np.asarray(jax.device_get(v.get_value()))
               for path, v in nnx.to_flat_state(state)}
    save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "vipo_jax", "kind": kind})


def read_native_config(folder: str | os.PathLike, kind: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"config.json not found in {folder}")
    cfg = json.loads(path.read_text())
    found = cfg.pop("vipo_kind", None)
    if found != kind:
        raise CheckpointError(f"{folder} holds a {found!r} checkpoint, expected {kind!r}")
    return {k: _tuples(v) for k, v in cfg.items()}


def load_native(folder: str | os.PathLike, kind: str, config_cls: type, model_cls: type, *,
                sharding: ShardingFn | None = None, **overrides: Any) -> nnx.Module:
    raw = read_native_config(folder, kind)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if hasattr(config_cls, "from_dict"):
        cfg = config_cls.from_dict(raw, **overrides)
    else:
        names = {f.name for f in dataclasses.fields(config_cls)}
        cfg = config_cls(**{k: v for k, v in {**raw, **overrides}.items() if k in names})
    abstract = abstract_model(model_cls, cfg)
    tensors = open_checkpoint(folder, stem="model")
    model = load_into(abstract, tensors, where=str(Path(folder) / "model.safetensors"), sharding=sharding)
    return model
