"""The sampling sigma grid (docs/METHOD.md §1): DanceGRPO's ``sd3_time_shift`` of a uniform grid.

The shift concentrates steps at high noise, where the flow model decides global structure; the
same grid is used by the rollout and by the training-time log-prob, so it is computed in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vipo_jax.errors import ConfigError


def sigma_schedule(num_steps: int, shift: float) -> jax.Array:
    """``(S+1,)`` float32 sigmas from 1 (noise) down to 0 (clean).

    ``sigma_i = shift*u_i / (1 + (shift-1)*u_i)`` with ``u = linspace(1, 0, S+1)``. Both endpoints
    are exact (1 and 0) for any shift, so the last transition lands on the clean sample. ``num_steps``
    and ``shift`` are static config values."""
    if int(num_steps) < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if not float(shift) > 0:
        raise ConfigError(f"shift must be > 0, got {shift}")
    # Computed once in float64 on the host and rounded: identical on every backend.
    u = np.linspace(1.0, 0.0, int(num_steps) + 1, dtype=np.float64)
    s = float(shift)
    return jnp.asarray(s * u / (1.0 + (s - 1.0) * u), dtype=jnp.float32)
