"""Evaluation metrics of a world's samples, shared by the Flux and Wan worlds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vipo_jax.sharding import fetch, place, replicated


def eval_means(cache: dict, eval_fns: dict[str, Callable], frozen: Any, samples: np.ndarray,
               batch: dict) -> dict[str, float]:
    """Mean of every eval metric over host ``samples`` (images or videos): jitted once (kept in
    ``cache``), with the inputs replicated on the current mesh (``jax.set_mesh``), so it runs next
    to sharded frozen models on any host count."""
    args = (np.asarray(samples, np.float32), {k: np.asarray(v) for k, v in batch.items()})
    mesh = jax.sharding.get_mesh()
    if not mesh.empty:
        args = place(args, jax.tree.map(lambda _: replicated(mesh), args))
    if "eval" not in cache:
        cache["eval"] = jax.jit(lambda fr, x, b: {name: jnp.mean(fn(fr, x, b)) for name, fn in eval_fns.items()})
    return {k: float(v) for k, v in fetch(cache["eval"](frozen, *args)).items()}
