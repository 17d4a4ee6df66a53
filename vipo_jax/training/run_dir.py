"""A run's directory: the config it was trained with (``config.json``), read back by evaluation,
export and resume."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections as mlc

from vipo_jax.errors import CheckpointError


def run_config(workdir: str | Path) -> mlc.ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``, written by the train loop)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: no config.json (is it a vipo_jax run workdir?)")
    try:
        return mlc.ConfigDict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); restore it from the run's log or start a "
                              "new --workdir") from e
