"""Shared test setup: a persistent compilation cache (compiles are slow on 2 cores), a quiet,
deterministic torch on CPU, and helpers for the PyTorch reference libraries."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is compile-bound on 2 cores: XLA:CPU's LLVM at -O0 compiles a toy train step in half the
# time (19 s vs 36 s) and runs it ~1.5x slower; its results differ from -O3's by float32 rounding
# (a toy iteration's metrics by ~1e-7 relative: LLVM's vectorisation reorders some sums). Every
# comparison in the suite runs both of its paths under the same flags; the README's default run keeps
# -O3 (``FAST_COMPILE`` is removed from its child's XLA_FLAGS). Child processes inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

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
os.environ.setdefault("VIPO_COMPILE_CACHE", str(_CACHE))  # the CLI runs in child processes share it


def _torch():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def torch():
    return _torch()


#: The longest tests (minutes each on 2 cores), started first: pytest-xdist hands tests out in
#: collection order, and one of these collected last runs alone at the end while the other worker idles.
LONGEST_FIRST = ("tests/test_toy_train.py::test_embedded_default_run", "tests/test_wan_world.py::test_video_toy_cli",
                 "tests/test_real_world.py::test_train_cache_and_resume", "tests/test_toy_train.py::test_resume",
                 "tests/test_sharding.py::test_sharded_training", "tests/test_vs_pytorch.py::test_iteration",
                 "tests/test_multihost.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return (0, i)
        return (1 if item.get_closest_marker("slow") else 2, 0)

    items.sort(key=rank)  # stable: the order within a rank is the collection order
