"""Shared test setup: a persistent compilation cache (compiles are slow on 2 cores), a quiet,
deterministic torch on CPU, and helpers for the PyTorch reference libraries."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _torch():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def torch():
    return _torch()


def import_open_clip():
    """open_clip imports torchvision, whose compiled ops do not match the CPU torch wheel we pin;
    its fake-op registrations then fail at import. We only use open_clip's model classes, which
    never call those ops, so skip that one registration module."""
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import open_clip

    return open_clip


def assert_close(ours, ref, rel: float = 1e-4, what: str = "output") -> float:
    """Max abs error must be <= rel * max(1, max|ref|). Returns the error for reporting."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel:.0e} x scale {scale:.3g}"
    return err
