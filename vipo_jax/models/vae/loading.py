"""Loading the FLUX / SD AutoencoderKL (diffusers folder or BFL ae.safetensors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError
from vipo_jax.models.vae.config import AutoencoderKLConfig
from vipo_jax.models.vae.convert import convert_bfl_ae, convert_diffusers, detect_layout
from vipo_jax.models.vae.model import AutoencoderKL
from vipo_jax.weights.loading import ShardingFn, abstract_model, abstract_params, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(path: str | Path, *, config: AutoencoderKLConfig | Mapping[str, Any] | None = None,
             param_dtype: str | None = None, dtype: str | None = None,
             sharding: ShardingFn | None = None, **overrides: Any) -> AutoencoderKL:
    """Load the VAE strictly from a checkpoint.

    ``path`` is a diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    a diffusers pipeline folder holding ``vae/``, or a single ``.safetensors`` file in the diffusers
    or the BFL ``ae.safetensors`` layout (detected from the keys). ``config`` (a config or a
    config.json-style dict) replaces the folder's config.json; a ``diffusion_pytorch_model*`` file
    uses the config.json beside it; any other single file without ``config`` gets the FLUX.1 VAE
    config. ``param_dtype`` / ``dtype`` / ``overrides`` (e.g. ``remat``) set runtime options.
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    runtime = {"param_dtype": param_dtype, "dtype": dtype, **overrides}
    if isinstance(config, AutoencoderKLConfig):
        cfg = AutoencoderKLConfig.from_dict(dataclasses.asdict(config), **runtime)
    elif config is not None:
        cfg = AutoencoderKLConfig.from_dict(config, **runtime)
    elif path.is_dir():
        cfg = AutoencoderKLConfig.from_pretrained(path, **runtime)
    elif (path.is_file() and path.name.startswith("diffusion_pytorch_model")
          and (path.parent / "config.json").is_file()):
        cfg = AutoencoderKLConfig.from_pretrained(path.parent, **runtime)
    elif path.is_file():
        cfg = AutoencoderKLConfig.flux1(**runtime)
    else:
        raise CheckpointError(f"VAE checkpoint not found: {path}")

    tensors = open_checkpoint(path, stem="diffusion_pytorch_model" if path.is_dir() else None)
    where = str(getattr(tensors, "path", path))
    abstract = abstract_model(AutoencoderKL, cfg)
    expected = {k: v.shape for k, v in abstract_params(abstract).items()}
    if detect_layout(tensors.keys()) == "bfl":
        params = convert_bfl_ae(tensors, cfg, expected=expected, where=where)
    else:
        params = convert_diffusers(tensors, cfg, expected=expected, where=where)
    return load_into(abstract, params, where=where, sharding=sharding)
