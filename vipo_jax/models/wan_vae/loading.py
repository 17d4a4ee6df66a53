"""Loading the Wan2.1 VAE from a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError
from vipo_jax.models.wan_vae.config import WanVAEConfig
from vipo_jax.models.wan_vae.convert import convert_diffusers
from vipo_jax.models.wan_vae.model import WanVAE
from vipo_jax.weights.loading import ShardingFn, abstract_model, abstract_params, load_into
from vipo_jax.weights.safetensors_io import open_checkpoint


def from_pretrained(path: str | Path, *, param_dtype: str | None = None, dtype: str | None = None,
                 sharding: ShardingFn | None = None, **overrides: Any) -> WanVAE:
    """Load the Wan VAE strictly from a diffusers checkpoint.

    ``path`` is a pipeline root holding ``vae/`` (e.g. ``Wan2.1-T2V-1.3B-Diffusers``), the ``vae/``
    folder itself (``config.json`` + ``diffusion_pytorch_model.safetensors`` or its sharded index),
    or that weights file with its ``config.json`` beside it. ``param_dtype`` / ``dtype`` /
    ``overrides`` (e.g. ``attention``) set runtime options; ``sharding(name, shape_dtype)`` places
    each parameter as it is loaded.
    """
    path = Path(path)
    if path.is_file():
        if not (path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file()):
            raise CheckpointError(f"{path}: expected a diffusers vae/ folder, a pipeline root, or its "
                                  "diffusion_pytorch_model weights file with config.json beside it")
        folder, ckpt = path.parent, path
    elif path.is_dir():
        folder = path / "vae" if (not (path / "config.json").is_file()
                                  and (path / "vae" / "config.json").is_file()) else path
        ckpt = folder
    else:
        raise CheckpointError(f"Wan VAE checkpoint not found: {path}")
    cfg = WanVAEConfig.from_pretrained(folder, param_dtype=param_dtype, dtype=dtype, **overrides)
    tensors = open_checkpoint(ckpt, stem="diffusion_pytorch_model" if ckpt.is_dir() else None)
    where = str(getattr(tensors, "path", ckpt))
    abstract = abstract_model(WanVAE, cfg)
    expected = {k: v.shape for k, v in abstract_params(abstract).items()}
    params = convert_diffusers(tensors, cfg, expected=expected, where=where)
    return load_into(abstract, params, where=where, sharding=sharding)
