"""One step of the flow-matching sampler turned into an SDE (DanceGRPO's ``flux_step``, docs/METHOD.md §1).

Rectified flow ``x_sigma = (1-sigma)*x0 + sigma*eps`` with a velocity model ``v ~ eps - x0``. The
SDE step is a Gaussian policy ``N(mean, std^2)`` over the next state, whose element-wise log-prob
is what GRPO's likelihood ratio is built from.

Everything is computed in float32 whatever the input dtype (bf16 log-probs make the ratio drift
away from 1 on-policy). ``sigma``/``sigma_next``/``eta`` may be scalars or per-sample ``(B,)``
vectors (training batches mix timesteps); they broadcast against the batch-first ``x``.
A zero std (``eta == 0``, or ``sigma_next >= sigma``) is a deterministic step: its log-prob is
defined as 0 and no NaN/inf is produced, in values or in gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _f32(a: jax.Array | float) -> jax.Array:
    return jnp.asarray(a, dtype=jnp.float32)


def _bcast(s: jax.Array | float, x: jax.Array) -> jax.Array:
    """A scalar stays a scalar; a per-sample ``(B,)`` vector becomes ``(B, 1, ..., 1)``."""
    s = _f32(s)
    if s.ndim == 0:
        return s
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def x0_prediction(x: jax.Array, v: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Predicted clean sample ``x - sigma*v``: the output that is decoded for reward and PSM."""
    x, v = _f32(x), _f32(v)
    return x - _bcast(sigma, x) * v


def ode_step(x: jax.Array, v: jax.Array, sigma: jax.Array | float,
             sigma_next: jax.Array | float) -> jax.Array:
    """Deterministic Euler step of the flow ODE ``x + (sigma_next - sigma)*v`` (evaluation, eta=0)."""
    x, v = _f32(x), _f32(v)
    return x + (_bcast(sigma_next, x) - _bcast(sigma, x)) * v


def sde_mean_std(x: jax.Array, v: jax.Array, sigma: jax.Array | float, sigma_next: jax.Array | float,
                 eta: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the Gaussian transition ``p(x' | x)`` (docs/METHOD.md §1 formulas, DanceGRPO order).

    ``std`` keeps the broadcast shape of sigma (scalar or ``(B, 1, ..., 1)``) to save memory."""
    x, v = _f32(x), _f32(v)
    s, sn, e = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(eta, x)
    dsigma = sn - s
    x0 = x - s * v
    # sigma is > 0 for every valid starting point; guard the division so sigma == 0 cannot NaN.
    s2 = jnp.where(s > 0, s * s, 1.0)
    score = -(x - (1.0 - s) * x0) / s2
    mean = (x + dsigma * v) + (-0.5 * e * e * score) * dsigma
    std = e * jnp.sqrt(jnp.maximum(s - sn, 0.0))
    return mean, std


def sde_step(x: jax.Array, v: jax.Array, sigma: jax.Array | float, sigma_next: jax.Array | float,
             eta: jax.Array | float, noise: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One SDE step: returns ``(x_next, mean, std)`` with ``x_next = mean + std*noise``."""
    mean, std = sde_mean_std(x, v, sigma, sigma_next, eta)
    x_next = mean + std * _f32(noise)
    return x_next, mean, std


def sde_logprob(x_next: jax.Array, mean: jax.Array, std: jax.Array | float) -> jax.Array:
    """Element-wise ``log N(x_next; mean, std^2)`` in float32; 0 where ``std == 0``.

    Computed from ``x_next - mean`` (never from the noise) so that the rollout and the training
    recomputation evaluate the very same expression and the ratio is 1 on-policy."""
    x_next, mean, std = _f32(x_next), _f32(mean), _f32(std)
    pos = std > 0
    safe = jnp.where(pos, std, 1.0)
    diff = x_next - mean
    lp = -(diff * diff) / (2.0 * safe * safe) - jnp.log(safe) - _HALF_LOG_2PI
    return jnp.where(pos, lp, jnp.zeros_like(lp))


def transition_logprob(x: jax.Array, v: jax.Array, x_next: jax.Array, sigma: jax.Array | float,
                       sigma_next: jax.Array | float, eta: jax.Array | float) -> jax.Array:
    """Element-wise log-prob of an observed transition ``x -> x_next`` given the velocity ``v``.

    The one function both the rollout and the policy update use (same ops, same order). Its
    inputs pass an optimization barrier, so XLA compiles this expression the same way in both
    places (fused with different neighbours, float contractions differ in the last bits and the
    on-policy ratio would not be exactly 1)."""
    x, v, x_next = _f32(x), _f32(v), _f32(x_next)
    sigma, sigma_next, eta = (jnp.asarray(a, jnp.float32) for a in (sigma, sigma_next, eta))
    x, v, x_next, sigma, sigma_next, eta = jax.lax.optimization_barrier((x, v, x_next, sigma, sigma_next, eta))
    mean, std = sde_mean_std(x, v, sigma, sigma_next, eta)
    return sde_logprob(x_next, mean, std)
