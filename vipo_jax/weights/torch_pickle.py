"""Reading PyTorch pickled checkpoints (``.pt``) safely, for the one-time conversions to safetensors
(``python -m vipo_jax.convert``). torch is imported only here, and only when such a file is read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vipo_jax.errors import CheckpointError


def _torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            "reading a PyTorch .pt checkpoint needs torch, which is not installed: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu"
        ) from e
    return torch


def _to_numpy(torch, t) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_torch_state_dict(src: str | Path) -> dict[str, np.ndarray]:
    """A torch pickle -> ``{name: numpy array}``, safely (``weights_only=True``: no code runs).
    A ``{"state_dict" | "model" | "module": ...}`` wrapper and DistributedDataParallel ``module.``
    prefixes are undone."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    torch = _torch()
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many exception types for a bad file
        raise CheckpointError(
            f"{src} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]}). "
            "Only plain tensor checkpoints load with weights_only=True."
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{src} does not hold a state dict (got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{src}: entry {k!r} is a {type(v).__name__}, not a tensor: "
                                  "not a model state dict")
        out[k[len("module."):] if str(k).startswith("module.") else str(k)] = _to_numpy(torch, v)
    return out
