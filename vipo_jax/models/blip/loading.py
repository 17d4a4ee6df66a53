"""Loader: a converted ImageReward folder -> :class:`ImageRewardModel`, strictly (no random init)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError
from vipo_jax.models.blip.config import ImageRewardConfig
from vipo_jax.models.blip.convert import convert_image_reward
from vipo_jax.models.blip.model import ImageRewardModel
from vipo_jax.weights.loading import ShardingFn, abstract_model, dtype_overrides, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(folder: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None,
                      sharding: ShardingFn | None = None, **overrides: Any) -> ImageRewardModel:
    """Load the folder ``python -m vipo_jax.convert image-reward ImageReward.pt FOLDER`` wrote
    (``config.json`` + ``model.safetensors``). ``overrides``: ImageRewardConfig fields such as
    ``remat`` or ``attention``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"ImageReward folder not found: {folder}")
    overrides = dtype_overrides(overrides, param_dtype, dtype)
    cfg = ImageRewardConfig.from_pretrained(folder, **overrides)
    params = convert_image_reward(open_checkpoint(folder, "model"), cfg, where=str(folder))
    abstract = abstract_model(ImageRewardModel, cfg)
    return load_into(abstract, params, where=str(folder), sharding=sharding)
