"""What every model config shares: reading ``config.json``, picking the dataclass's fields from a
reference library's dict, and validating the runtime options (dtypes, remat policy, attention
kernel), so each family's config only states its own architecture checks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.nn.attention import available_attention
from vipo_jax.nn.stack import REMAT_POLICIES

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention")


def read_config_json(folder: str | Path, *, subfolders: Iterable[str] = (), class_names: Iterable[str] = (),
                     what: str = "model folder") -> dict[str, Any]:
    """``folder/config.json`` (or ``folder/<sub>/config.json`` for the first ``sub`` of ``subfolders``
    that has one, e.g. a pipeline root's ``transformer/``). ``folder`` may also be the file itself.
    With ``class_names``, a diffusers ``_class_name`` outside them is refused."""
    folder = Path(folder)
    path = folder if folder.is_file() else folder / "config.json"
    if not path.is_file():
        for sub in subfolders:
            if (folder / sub / "config.json").is_file():
                path = folder / sub / "config.json"
                break
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}: not a {what}")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable config {path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    names = tuple(class_names)
    cls_name = d.get("_class_name")
    if names and cls_name is not None and cls_name not in names:
        raise CheckpointError(f"{path} describes a {cls_name}, not a {' / '.join(names)}")
    return d


def pick_fields(cls: type, d: Mapping[str, Any], overrides: Mapping[str, Any], *,
                skip: Iterable[str] = (), keep_none: Iterable[str] = ()) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from a reference ``config.json`` dict and explicit overrides.

    Keys ``cls`` does not have are ignored in ``d`` (reference files carry many) but refused in
    ``overrides`` (a typo there must not pass silently). A ``None`` means "unset, take the default",
    except for the fields in ``keep_none``; ``skip`` fields are only taken from ``overrides`` (e.g.
    ``dtype``, which in a transformers file is the dtype the checkpoint was saved in)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid: {sorted(names)}")
    skip, keep_none = set(skip), set(keep_none)
    kw = {k: v for k, v in d.items() if k in names and k not in skip and (v is not None or k in keep_none)}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def normalize_runtime(cfg: Any, what: str) -> None:
    """Validate (and canonicalise to names) the runtime fields a frozen config dataclass has:
    ``param_dtype`` / ``dtype`` (a name or a numpy / jnp dtype), ``remat``, ``attention``."""
    for name in ("param_dtype", "dtype"):
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if not isinstance(value, str):
            try:
                value = jnp.dtype(value).name
            except TypeError:
                raise ConfigError(f"{what}.{name} must be one of {FLOAT_DTYPES}, got {value!r}") from None
        if value not in FLOAT_DTYPES:
            raise ConfigError(f"{what}.{name} must be one of {FLOAT_DTYPES}, got {value!r}")
        object.__setattr__(cfg, name, value)
    if hasattr(cfg, "remat") and cfg.remat not in REMAT_POLICIES:
        raise ConfigError(f"{what}.remat {cfg.remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
    if hasattr(cfg, "attention") and cfg.attention not in available_attention():
        raise ConfigError(f"{what}.attention {cfg.attention!r} unknown; available: {available_attention()}")


def architecture_dict(cfg: Any) -> dict[str, Any]:
    """The config's fields without the runtime options: what a ``config.json`` holds."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
