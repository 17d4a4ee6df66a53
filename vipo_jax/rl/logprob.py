"""Log-probabilities of sampled transitions: their reduction to one ratio per latent position or per
sample, and the training-side recomputation under the current policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.sde import transition_logprob

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

LOGPROB_REDUCTIONS = ("position_sum", "sample_mean")


def reduce_logprob(logp: jax.Array, reduction: str | None) -> jax.Array:
    """Reduce element-wise log-probs ``(B, *P, C)`` (channels last).

    ``position_sum``: sum over channels -> ``(B, *P)``, one likelihood per latent position (the
    paper's per-position ratio). ``sample_mean``: mean over every non-batch element -> ``(B,)``, as
    DanceGRPO's ``log_prob.mean(dim=tuple(range(1, ndim)))``. ``None`` keeps it element-wise."""
    logp = jnp.asarray(logp, jnp.float32)
    if reduction is None:
        return logp
    if reduction == "position_sum":
        return jnp.sum(logp, axis=-1)
    if reduction == "sample_mean":
        return jnp.mean(logp, axis=tuple(range(1, logp.ndim)))
    raise ConfigError(f"logprob_reduction must be one of {LOGPROB_REDUCTIONS} or None, got {reduction!r}")


def step_logprob(velocity_fn: VelocityFn, x: jax.Array, x_next: jax.Array, sigma: jax.Array,
                 sigma_next: jax.Array, eta: jax.Array | float, cond: Any, *,
                 logprob_reduction: str | None = None) -> jax.Array:
    """Log-prob of observed transitions under the current policy (the training recomputation).

    ``sigma``/``sigma_next`` are ``(B,)`` (each sample may be at a different trained step); same
    expression as in :func:`rollout`, so before any update the ratio is exactly 1."""
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    sb = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    snb = jnp.broadcast_to(jnp.asarray(sigma_next, jnp.float32), (batch,))
    eb = jnp.broadcast_to(jnp.asarray(eta, jnp.float32), (batch,))
    v = jnp.asarray(velocity_fn(x, sb, cond), jnp.float32)
    return reduce_logprob(transition_logprob(x, v, x_next, sb, snb, eb), logprob_reduction)
