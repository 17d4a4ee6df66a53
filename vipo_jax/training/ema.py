"""An exponential moving average of the trained weights (``config.train.ema_decay``).

``state["ema"]`` is a float32 average of ``state["params"]`` (the adapters under LoRA): the step
updates it after the iteration's optimizer updates, the checkpoints hold it, and evaluation /
export can use it instead of the raw weights.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from vipo_jax.errors import ConfigError


def ema_decay(c: mlc.ConfigDict) -> float:
    """``c.train.ema_decay`` (0 when absent: EMA off), checked to be in [0, 1)."""
    decay = c.train.get("ema_decay", 0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) \
            or not 0 <= decay < 1:
        raise ConfigError(f"--config.train.ema_decay={decay!r} must be in [0, 1) (0: no EMA; e.g. 0.99 averages "
                          "about the last 100 iterations)")
    return float(decay or 0.0)


def init_ema(params: Any) -> Any:
    """The EMA's starting value: a float32 copy of ``params`` (its own buffers; the state is donated)."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def update_ema(ema: Any, params: Any, decay: float, applied: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` where ``applied`` (some optimizer update of the
    iteration went through), else unchanged: the EMA only follows accepted updates and stays finite
    when every update was skipped for a non-finite loss or gradient."""
    def one(e, p):
        new = decay * e + (1.0 - decay) * p.astype(e.dtype)
        return jnp.where(applied, new, e)

    return jax.tree.map(one, ema, params)


def as_params_dtype(tree: Any, like: Any) -> Any:
    """``tree`` (e.g. the float32 EMA) cast leafwise to the dtypes of ``like`` (the parameters)."""
    return jax.tree.map(lambda a, p: a.astype(p.dtype), tree, like)
