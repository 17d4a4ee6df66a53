"""Persistent XLA compilation cache, so restarts and repeated runs do not pay compiles again."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    path = Path(path or os.environ.get("VIPO_COMPILE_CACHE", Path.home() / ".cache" / "vipo_jax" / "xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
