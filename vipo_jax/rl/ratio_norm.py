"""GRPO-Guard's RatioNorm and gradient reweighting (arXiv 2510.22319), as pure functions.

Why. For a Gaussian transition ``p(x'|x) = N(mu, s^2)`` sampled by the old policy,
``x' = mu_old + s*eps``, the per-element log importance ratio is

    log rho = log p_new(x') - log p_old(x') = eps*Delta/s - Delta^2/(2 s^2),   Delta = mu_new - mu_old,

so its mean is ``-Delta^2/(2 s^2) < 0`` (the ratio is left-shifted below 1, and PPO's clip stops
catching positive-advantage samples) and its spread scales as ``1/s``, which differs by an order
of magnitude across denoising steps. RatioNorm removes the shift and the step-dependent scale:

    log rho_hat = s * ( log rho + Delta^2 / (2 s^2) )          ( = eps * Delta )

and the gradient reweighting multiplies each step's clipped-surrogate loss by
``delta_t = 1/dt = 1/(sigma_t - sigma_{t+1})`` to equalise gradient magnitudes across noise levels.

Source of the exact form: the paper's RatioNorm (cited as its Eq. 8 by implementations), as
implemented in the public GRPO-Guard losses (verl-omni ``GRPOGuardLoss`` in
``verl_omni/trainer/diffusion/diffusion_algos.py``; the "Guard-GRPO logic" of flow_grpo-derived
training scripts): per sample,
``ratio = exp((log_prob - old_log_prob + mean(Delta^2)/(2 (sqrt_dt*std_dev_t)^2)) * sqrt_dt*std_dev_t)``
with ``log_prob`` the mean over the latent's elements, and ``loss = mean(max(-A*ratio,
-A*clip(ratio))) / sqrt_dt^2``. Their ``sqrt_dt * std_dev_t`` is the transition's std ``s``; in
this project's SDE (``rl.sde``) ``s = eta*sqrt(sigma - sigma_next)``. It is applied in the loss of
every trained SDE transition, before the PPO clip; sampling and advantages are unchanged.

Generalisation here: the log-ratio may be reduced per latent position (``position_sum``, ViPO's
per-position ratio) or per sample (``sample_mean``, the reference's reduction); ``Delta^2`` is
reduced the same way, so ``log rho_hat = reduce(eps*Delta)`` holds for both. ``s`` is per sample
(training batches mix timesteps), where the reference uses one per-step scalar.

On-policy (before the first update, ``logp_new == logp_old`` and ``mu_new == mu_old`` bit for bit,
as the train step arranges it) the normalised log-ratio is exactly 0, the ratio exactly 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.sde import sde_mean_std, transition_logprob

_REDUCTIONS = ("position_sum", "sample_mean")


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _per_sample(s: jax.Array, like: jax.Array) -> jax.Array:
    """A scalar stays a scalar; ``(B,)`` or ``(B, 1, ..., 1)`` becomes ``(B, 1, ..., 1)`` for ``like``."""
    s = _f32(s)
    if s.ndim == 0:
        return s
    return s.reshape((s.shape[0],) + (1,) * (like.ndim - 1))


def ratio_norm_elementwise(logp_new: jax.Array, logp_old: jax.Array, mean_new: jax.Array, mean_old: jax.Array,
                           std: jax.Array) -> jax.Array:
    """Element-wise normalised log-ratio ``s*(logp_new - logp_old) + (mean_new - mean_old)^2 / (2 s)``.

    Inputs element-wise ``(B, *P, C)``; ``std`` the transition std ``s``: scalar, ``(B,)`` or the
    ``(B, 1, ..., 1)`` of ``rl.sde.sde_mean_std``. Any linear reduction of this array (sum over
    channels, mean over everything) is the RatioNorm of the equally reduced log-ratio, so it can be
    passed to ``rl.policy_loss`` as ``logp_new`` with ``logp_old = zeros`` (the loss then forms
    ``exp(reduce(.))``). Gradients flow through ``logp_new`` and ``mean_new``; ``logp_old`` and
    ``mean_old`` are stopped. Where ``s == 0`` (no SDE ran) the result is 0."""
    lpn, lpo = _f32(logp_new), jax.lax.stop_gradient(_f32(logp_old))
    mn, mo = _f32(mean_new), jax.lax.stop_gradient(_f32(mean_old))
    s = _per_sample(std, lpn)
    pos = s > 0
    safe = jnp.where(pos, s, 1.0)
    d = mn - mo
    out = safe * (lpn - lpo) + (d * d) / (2.0 * safe)
    return jnp.where(pos, out, jnp.zeros_like(out))


def ratio_norm_log_ratio(logp_new: jax.Array, logp_old: jax.Array, mean_new: jax.Array, mean_old: jax.Array,
                         std: jax.Array, *, reduction: str = "position_sum") -> jax.Array:
    """RatioNorm of the reduced log-ratio: ``s * (R(logp_new - logp_old) + R(Delta^2) / (2 s^2))``.

    ``R`` is ``reduction``: ``position_sum`` (sum over the channel axis, ``(B, *P)``) or
    ``sample_mean`` (mean over all non-batch axes, ``(B,)``, the reference implementation's)."""
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"ratio_norm reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    r = ratio_norm_elementwise(logp_new, logp_old, mean_new, mean_old, std)
    if reduction == "position_sum":
        return jnp.sum(r, axis=-1)
    return jnp.mean(r, axis=tuple(range(1, r.ndim)))


def step_weight(sigma: jax.Array, sigma_next: jax.Array, *, reference: jax.Array | float | None = None) -> jax.Array:
    """GRPO-Guard's gradient reweighting ``delta_t = 1 / dt = 1 / (sigma - sigma_next)`` (per sample).

    ``reference``: divide by it (e.g. the mean of ``1/dt`` over the trainable transitions, from
    :func:`mean_step_weight`) so the weights average to about 1 and the learning rate keeps its
    meaning; ``None`` is the reference's raw ``1/dt``. A non-positive ``dt`` gets weight 0."""
    dt = _f32(sigma) - _f32(sigma_next)
    w = jnp.where(dt > 0, 1.0 / jnp.where(dt > 0, dt, 1.0), 0.0)
    if reference is not None:
        w = w / _f32(reference)
    return w


def mean_step_weight(sigmas: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    """Mean of ``1/dt`` over the given transitions (default: the first ``S-1``, the trainable ones)."""
    s = _f32(sigmas)
    t = jnp.arange(s.shape[0] - 2) if timesteps is None else jnp.asarray(timesteps, jnp.int32)
    return jnp.mean(step_weight(s[t], s[t + 1]))


def guard_transition(velocity_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], x: jax.Array,
                     x_next: jax.Array, sigma: jax.Array, sigma_next: jax.Array, eta: jax.Array | float,
                     cond: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The training recomputation for RatioNorm: ``(logp, mean, std)`` of observed transitions.

    ``logp`` is element-wise ``rl.sde.transition_logprob`` (the rollout's function: on-policy it
    equals the rollout's value), ``mean``/``std`` from ``rl.sde.sde_mean_std`` with the same
    velocity (``std`` is ``(B, 1, ..., 1)``). ``sigma``/``sigma_next``/``eta`` are broadcast to
    ``(B,)`` as in ``rl.rollout.step_logprob``."""
    x = _f32(x)
    batch = x.shape[0]
    sb = jnp.broadcast_to(_f32(sigma), (batch,))
    snb = jnp.broadcast_to(_f32(sigma_next), (batch,))
    eb = jnp.broadcast_to(_f32(eta), (batch,))
    v = _f32(velocity_fn(x, sb, cond))
    logp = transition_logprob(x, v, x_next, sb, snb, eb)
    mean, std = sde_mean_std(x, v, sb, snb, eb)
    return logp, mean, std
