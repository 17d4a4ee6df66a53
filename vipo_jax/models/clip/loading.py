"""Loaders: config + safetensors checkpoint -> CLIP modules, strictly (no random init)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.clip.config import (
    OPEN_CLIP_CONFIGS,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
)
from vipo_jax.models.clip.convert import convert_hf, convert_open_clip, detect_layout
from vipo_jax.models.clip.model import CLIPModel
from vipo_jax.models.clip.text import CLIPTextModel
from vipo_jax.models.clip.vision import CLIPVisionModel
from vipo_jax.weights.loading import ShardingFn, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint

LAYOUTS = ("hf", "open_clip")


def _open_folder(folder: Path) -> Mapping:
    stem = "model" if any((folder / f"model{s}").is_file()
                          for s in (".safetensors", ".safetensors.index.json")) else None
    return open_checkpoint(folder, stem)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable config {path}: {e}") from e


def _resolve_config(config: Any, path: Path, overrides: dict[str, Any]) -> CLIPConfig:
    if isinstance(config, CLIPConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, Mapping):
        return CLIPConfig.from_dict(config, **overrides)
    if isinstance(config, str) and config in OPEN_CLIP_CONFIGS:
        return CLIPConfig.from_dict(OPEN_CLIP_CONFIGS[config], **overrides)
    if config is not None:
        return CLIPConfig.from_dict(_read_json(Path(config)), **overrides)
    candidates = ([path / "config.json"] if path.is_dir()
                  else [path.with_suffix(".json"), path.parent / "config.json"])
    for c in candidates:
        if c.is_file():
            return CLIPConfig.from_dict(_read_json(c), **overrides)
    raise CheckpointError(f"no CLIP config for {path}: looked for {[str(c) for c in candidates]}; "
                          "pass config= (a CLIPConfig, a dict, a json path or an open_clip model name)")


def _load_model(path_or_file: str | os.PathLike, *, layout: str | None = None, config: Any = None,
                param_dtype: Any = None, dtype: Any = None, sharding: ShardingFn | None = None,
                **overrides: Any) -> CLIPModel:
    """Load a full CLIP model.

    ``path_or_file``: a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``,
    e.g. PickScore), or a ``.safetensors`` file with its config in ``<stem>.json`` or
    ``config.json`` beside it (what ``python -m vipo_jax.convert hps`` writes). ``layout``:
    ``"hf"`` or ``"open_clip"``; ``None`` detects it from the key names. ``config`` overrides the
    config file (CLIPConfig, dict in transformers or open_clip form, json path, or an open_clip
    model name such as ``"ViT-H-14"``). ``overrides``: config fields (``remat``, ``attention``...)."""
    path = Path(path_or_file)
    if not path.exists():
        raise CheckpointError(f"CLIP checkpoint not found: {path}")
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cfg = _resolve_config(config, path, dtype_overrides(overrides, param_dtype, dtype))
    tensors = _open_folder(path) if path.is_dir() else open_checkpoint(path)
    layout = layout or detect_layout(tensors.keys())
    where = str(path)
    params = (convert_open_clip if layout == "open_clip" else convert_hf)(tensors, cfg, where)
    abstract = abstract_model(CLIPModel, cfg)
    return load_into(abstract, params, where=where, sharding=sharding)


def _load_text(folder: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None,
               sharding: ShardingFn | None = None, **overrides: Any) -> CLIPTextModel:
    """Load a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder (e.g. FLUX's
    ``text_encoder/``) as a :class:`CLIPTextModel`; ``overrides`` are CLIPTextConfig fields."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"CLIP text encoder folder not found: {folder}")
    cfg = CLIPTextConfig.from_pretrained(folder, **dtype_overrides(overrides, param_dtype, dtype))
    params = convert_hf(_open_folder(folder), cfg, str(folder))
    abstract = abstract_model(CLIPTextModel, cfg)
    return load_into(abstract, params, where=str(folder), sharding=sharding)


def _load_vision(folder: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None,
                 sharding: ShardingFn | None = None, **overrides: Any) -> CLIPVisionModel:
    """Load a transformers ``CLIPVisionModel`` folder as a :class:`CLIPVisionModel`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"CLIP vision encoder folder not found: {folder}")
    cfg = CLIPVisionConfig.from_pretrained(folder, **dtype_overrides(overrides, param_dtype, dtype))
    params = convert_hf(_open_folder(folder), cfg, str(folder))
    abstract = abstract_model(CLIPVisionModel, cfg)
    return load_into(abstract, params, where=str(folder), sharding=sharding)


COMPONENTS = ("model", "text", "vision")


def from_pretrained(path: str | os.PathLike, *, component: str = "model", **kwargs: Any) -> Any:
    """Load a CLIP checkpoint: ``component="model"`` the full :class:`CLIPModel` (a transformers
    ``CLIPModel`` folder, or a ``.safetensors`` file with its config beside it: ``layout``,
    ``config`` see :func:`_load_model`), ``"text"`` a :class:`CLIPTextModel` (e.g. FLUX's
    ``text_encoder/``), ``"vision"`` a :class:`CLIPVisionModel`. ``kwargs``: ``param_dtype``,
    ``dtype``, ``sharding`` and config overrides."""
    loaders = {"model": _load_model, "text": _load_text, "vision": _load_vision}
    if component not in loaders:
        raise ConfigError(f"CLIP component must be one of {COMPONENTS}, got {component!r}")
    return loaders[component](path, **kwargs)
