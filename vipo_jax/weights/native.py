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
from vipo_jax.utils.cli import read_json_object
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
    cfg = read_json_object(path, "restore it from the model's source (export or download it again)")
    found = cfg.pop("vipo_kind", None)
    if found != kind:
        raise CheckpointError(f"{folder} holds a {found!r} checkpoint, expected {kind!r}")
    return {k: _tuples(v) for k, v in cfg.items()}


def _type_ok(annotation: str, v: Any) -> bool:
    """Whether ``v`` (a JSON value) fits a dataclass field's annotation (a string under postponed
    annotations); annotations other than int / float / bool / str / None / tuple / list pass."""
    for a in (x.strip() for x in str(annotation).split("|")):
        base = a.split("[", 1)[0]
        if (a == "None" and v is None or base == "bool" and isinstance(v, bool)
                or base == "int" and isinstance(v, int) and not isinstance(v, bool)
                or base == "float" and isinstance(v, int | float) and not isinstance(v, bool)
                or base == "str" and isinstance(v, str)
                or base in ("tuple", "list", "Sequence") and isinstance(v, list | tuple)
                or base not in ("None", "bool", "int", "float", "str", "tuple", "list", "Sequence")):
            return True
    return False


def check_field_types(config_cls: type, raw: dict, where: str) -> None:
    """Every field of ``raw`` (a config.json) that ``config_cls`` has holds a value of its type, so a
    wrong-typed field fails naming the file and the field, not deep inside the model."""
    if not dataclasses.is_dataclass(config_cls):
        return
    for f in dataclasses.fields(config_cls):
        if f.name in raw and not _type_ok(f.type, raw[f.name]):
            raise CheckpointError(f"{where}: field {f.name!r} is {raw[f.name]!r} ({type(raw[f.name]).__name__}); "
                                  f"{config_cls.__name__} expects {f.type}. Fix the file or export the model again")


def load_native(folder: str | os.PathLike, kind: str, config_cls: type, model_cls: type, *,
                sharding: ShardingFn | None = None, **overrides: Any) -> nnx.Module:
    raw = read_native_config(folder, kind)
    where = str(Path(folder) / "config.json")
    check_field_types(config_cls, raw, where)
    overrides = {k: v for k, v in overrides.items() if v is not None}

    def make(over: dict) -> Any:
        if hasattr(config_cls, "from_dict"):
            return config_cls.from_dict(raw, **over)
        names = {f.name for f in dataclasses.fields(config_cls)}
        return config_cls(**{k: v for k, v in {**raw, **over}.items() if k in names})

    try:  # the file alone first, so that its own errors name it; the caller's overrides' errors are theirs
        make({})
    except (TypeError, ValueError) as e:  # ConfigError included
        raise CheckpointError(f"{where}: not a valid {config_cls.__name__} ({' '.join(str(e).split())})") from e
    cfg = make(overrides)
    abstract = abstract_model(model_cls, cfg)
    tensors = open_checkpoint(folder, stem="model")
    model = load_into(abstract, tensors, where=str(Path(folder) / "model.safetensors"), sharding=sharding)
    return model
