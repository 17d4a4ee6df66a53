"""Shared test setup: a persistent compilation cache (compiles are slow on 2 cores), a quiet,
deterministic torch on CPU, and helpers for the PyTorch reference libraries."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import types  # noqa: E402

# transformers, diffusers and open_clip import torchvision when it is installed; its compiled ops
# do not match the CPU torch wheel we pin, so its fake-op registrations fail at import. The
# reference models never call those ops: skip that one registration module.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402
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
