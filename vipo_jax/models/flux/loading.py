"""Loading a FLUX.1 DiT from the layouts users download (diffusers folder or files, BFL single file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.flux.config import FluxConfig, preset
from vipo_jax.models.flux.convert import bfl_has_guidance, convert_bfl, convert_diffusers, is_bfl_layout
from vipo_jax.models.flux.model import FluxTransformer
from vipo_jax.weights.loading import ShardingFn, abstract_model, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def _open_diffusers_folder(folder: Path) -> Mapping[str, np.ndarray]:
    try:
        return open_checkpoint(folder, stem="diffusion_pytorch_model")
    except CheckpointError:
        return open_checkpoint(folder)

def _with(cfg: FluxConfig, runtime: dict[str, Any]) -> FluxConfig:
    """``cfg`` with the given (non-None) fields replaced; unknown names raise ConfigError."""
    return FluxConfig.from_dict(dataclasses.asdict(cfg), **runtime)

def from_pretrained(path: str | Path, *, param_dtype: str | None = None, dtype: str | None = None,
                          sharding: ShardingFn | None = None, config: FluxConfig | str | None = None,
                          **overrides: Any) -> FluxTransformer:
    """Load a FLUX.1 DiT from

    * a diffusers transformer folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
      sharded or not), or a pipeline root holding ``transformer/``;
    * a single BFL ``.safetensors`` file. Its config is ``config`` (a :class:`FluxConfig` or a
      preset name, ``"flux-dev"`` / ``"flux-schnell"``; default: the real FLUX.1 sizes), with
      ``guidance_embeds`` always taken from the presence of ``guidance_in.*`` in the file;
    * a single diffusers-layout ``.safetensors`` / ``.index.json`` file, configured by ``config``
      or by the ``config.json`` next to it.

    ``param_dtype`` / ``dtype`` and ``overrides`` (``remat``, ``attention``, ...) replace config
    fields. ``sharding(name, ShapeDtypeStruct)`` places each parameter as it is loaded.
    """
    path = Path(path)
    runtime = {"param_dtype": param_dtype, "dtype": dtype, **overrides}
    if isinstance(config, str):
        config = preset(config)

    if path.is_dir():
        folder = path
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            folder = path / "transformer"
        cfg = FluxConfig.from_pretrained(folder, **runtime) if config is None else _with(config, runtime)
        tensors = _open_diffusers_folder(folder)
        params = convert_diffusers(tensors, cfg, where=str(folder))
    elif path.is_file():
        tensors = open_checkpoint(path)
        keys = list(tensors.keys())
        if is_bfl_layout(keys):
            base = config if config is not None else preset("flux-dev")
            cfg = _with(base, {**runtime, "guidance_embeds": bfl_has_guidance(keys)})
            params = convert_bfl(tensors, cfg, where=str(path))
        else:
            if config is not None:
                cfg = _with(config, runtime)
            else:
                cfg = FluxConfig.from_pretrained(path.parent, **runtime)
            params = convert_diffusers(tensors, cfg, where=str(path))
    else:
        raise CheckpointError(f"FLUX checkpoint not found: {path}")

    abstract = abstract_model(FluxTransformer, cfg)
    return load_into(abstract, params, where=str(path), sharding=sharding)
