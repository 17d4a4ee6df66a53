"""Windowed SDE sampling (MixGRPO, arXiv 2507.21802) as pure, jittable functions.

MixGRPO samples with the SDE only inside a window of ``W`` consecutive transitions and with the
deterministic ODE everywhere else; only the window's transitions carry a log-prob and are trained.
The window moves between iterations (``window_start``), and outside it a higher-order ODE solver
may be used (MixGRPO-Flash: DPM-Solver++ 2nd order), since those steps are never trained.

Indices: ``S = len(sigmas) - 1`` transitions ``i = 0..S-1`` (``x_i -> x_{i+1}``, ``sigma_i ->
sigma_{i+1}``). The last one (to sigma = 0) is always an ODE step and never trained, as in
:func:`vipo_jax.rl.rollout.rollout`; a window therefore lies inside the first ``S-1``
transitions: ``0 <= start <= S-1-W``. ``window = 0`` means "no window": every one of the first
``S-1`` transitions is an SDE step (today's behaviour).

Window schedules (MixGRPO ``fastvideo/utils/grpo_states.py``, ``GRPOTrainingStates``):

* ``"sliding"`` (MixGRPO ``sample_strategy="progressive"`` with ``prog_overlap`` and ``roll_back``,
  the released recipe): the start moves by ``stride`` every ``every`` iterations (MixGRPO's
  ``prog_overlap_step`` and ``iters_per_group``; 1 and 25 in ``finetune_flux_grpo_MixGRPO.sh``,
  20 for Flash) and rolls back to 0 once it would pass the last full window:
  ``start = ((iteration // every) mod n) * stride`` with ``n = (S-1-W) // stride + 1`` positions.
  ``stride = 0`` freezes the window at 0 (MixGRPO-Flash*, ``prog_overlap_step=0``).
  Deviation from the reference code: it lets the window run up to index ``S-2`` exclusive and
  truncates it there (``range(cur, min(cur+W, S-2))``, so the last windows shrink and one is
  empty); here every window has exactly ``W`` transitions (static shapes) and may include
  transition ``S-2``.
* ``"random"`` (MixGRPO ``sample_strategy="random"``): ``start ~ U{0, ..., S-1-W}``.

ODE solvers outside the window (``ode_solver``):

* ``"euler"``: ``x' = x + (sigma' - sigma) v``, computed exactly as the current rollout computes
  its deterministic steps (an SDE step with ``eta = 0``). With an all-True mask the windowed
  rollout is the current rollout, bit for bit.
* ``"dpm2"``: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, multistep 2nd order, "midpoint"
  variant), the solver of MixGRPO-Flash (``fastvideo/utils/sampling_utils.py``,
  ``multistep_dpm_solver_second_order_update`` with ``dpm_solver_type=midpoint``). For rectified
  flow ``alpha = 1 - sigma``, data prediction ``m_i = x_i - sigma_i v_i`` and
  ``lambda = log(alpha / sigma)``; a step ``s = sigma_i -> t = sigma_{i+1}`` with the previous
  point ``u = sigma_{i-1}``::

      h = lambda_t - lambda_s,  r = (lambda_s - lambda_u) / h
      D0 = m_i,  D1 = (m_i - m_{i-1}) / r
      x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) (D0 + D1 / 2)

  computed as ``x_t = (sigma_t/sigma_s) x_s + (alpha_t - sigma_t alpha_s / sigma_s)(D0 + D1/2)``
  (``exp(-h) = sigma_t alpha_s / (alpha_t sigma_s)``, no infinite lambdas). Without the ``D1``
  term this is exactly the Euler step. The first-order step is used where no usable previous
  output exists: the first transition, the step after ``sigma = 1`` (``lambda_u = -inf``), the
  last transition (to ``sigma = 0``, DPM-Solver's ``lower_order_final``; it keeps ``latents[S]``
  equal to the final clean prediction), and, by default, the first ODE step after an SDE step
  (its previous data prediction was made before the noise was injected, so ``D1`` would mostly
  estimate the noise; ``history_across_sde=True`` keeps it, as MixGRPO's flow-GRPO path does).
  The solver's history (``m_{i-1}``, ``sigma_{i-1}``) rides in the scan carry; SDE steps and their
  log-probs are computed exactly as in the Euler path and never read it.

* ``"ab2"``: variable-step Adams-Bashforth 2 in sigma with the previous velocity,
  ``x' = x + h ((1 + h/(2 h_prev)) v_i - h/(2 h_prev) v_{i-1})``, ``h = sigma_{i+1} - sigma_i``,
  ``h_prev = sigma_i - sigma_{i-1}``: the plain multistep alternative (no singular ``lambda`` at
  ``sigma = 0`` or 1, so it keeps its order on the full ``1 -> 0`` grid). Same first-order rules.

Both 2nd-order solvers cost nothing extra (one model call per step, as Euler); their gain depends
on the data: on a Gaussian test ODE (data std 1-2) with 16-64 shifted steps they are about 5-70x
more accurate than Euler, with 8 steps and a low data variance (std 0.3) only marginally
(tests/test_rl_windows.py).

MixGRPO-Flash also compresses the ODE steps after the window onto fewer, re-shifted sigmas
(``dpm_post_compress_ratio``). That changes the number of model calls with the window position
and is not expressible with the static shapes of one jitted step; it is not implemented here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.sde import sde_step, transition_logprob, x0_prediction

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
LogprobFn = Callable[..., jax.Array]

WINDOW_SCHEDULES = ("sliding", "random")
ODE_SOLVERS = ("euler", "dpm2", "ab2")
LOGPROB_REDUCTIONS = ("position_sum", "sample_mean")


# ----------------------------------------------------------------------------- window position
def effective_window(num_steps: int, window: int) -> int:
    """The window size in transitions: ``window``, or ``S-1`` for ``window = 0`` (no window).

    Raises ``ConfigError`` unless ``0 <= window <= S-1`` (static config values)."""
    s, w = int(num_steps), int(window)
    if s < 2:
        raise ConfigError(f"a windowed rollout needs at least 2 sampling steps, got {s}")
    if w < 0 or w > s - 1:
        raise ConfigError(f"sde_window={w} must be between 0 (no window) and {s - 1} (the trainable "
                          f"transitions of {s} sampling steps)")
    return s - 1 if w == 0 else w


def num_window_positions(num_steps: int, window: int, stride: int = 1) -> int:
    """Number of distinct starts the sliding schedule visits: ``(S-1-W) // stride + 1`` (1 for
    ``window = 0`` or ``stride = 0``)."""
    w = effective_window(num_steps, window)
    last = int(num_steps) - 1 - w
    if int(stride) < 0:
        raise ConfigError(f"window stride must be >= 0, got {stride}")
    return 1 if int(stride) == 0 else last // int(stride) + 1


def window_start(key_or_iteration: jax.Array | int, num_steps: int, window: int, schedule: str, *,
                 stride: int = 1, every: int = 25) -> jax.Array:
    """First transition of the SDE window this iteration, an int32 scalar (traceable).

    ``schedule="sliding"``: ``key_or_iteration`` is the iteration counter (e.g. the train state's
    ``step``); ``start = ((iteration // every) mod n) * stride`` with ``n`` from
    :func:`num_window_positions` (MixGRPO progressive + roll_back). ``schedule="random"``:
    ``key_or_iteration`` is a PRNG key; ``start`` is uniform over ``0..S-1-W``. ``window = 0``
    always gives 0."""
    w = effective_window(num_steps, window)
    last = int(num_steps) - 1 - w
    if schedule == "sliding":
        if int(every) < 1:
            raise ConfigError(f"window_every (iterations per window position) must be >= 1, got {every}")
        n = num_window_positions(num_steps, window, stride)
        it = jnp.asarray(key_or_iteration, jnp.int32)
        return ((it // int(every)) % n * int(stride)).astype(jnp.int32)
    if schedule == "random":
        return jax.random.randint(key_or_iteration, (), 0, last + 1, dtype=jnp.int32)
    raise ConfigError(f"window_schedule must be one of {WINDOW_SCHEDULES}, got {schedule!r}")


def sde_mask(start: jax.Array | int, num_steps: int, window: int) -> jax.Array:
    """``(S,)`` bool: True for the SDE transitions ``start <= i < start + W`` (never ``S-1``).

    ``window = 0``: every transition but the last (today's rollout)."""
    w = effective_window(num_steps, window)
    i = jnp.arange(int(num_steps))
    start = jnp.asarray(start, jnp.int32)
    return (i >= start) & (i < start + w) & (i < int(num_steps) - 1)


def window_metrics(start: jax.Array, sigmas: jax.Array, window: int) -> dict[str, jax.Array]:
    """What to log each iteration: the window's first/last transition and its sigma range."""
    s = jnp.asarray(sigmas, jnp.float32)
    w = effective_window(s.shape[0] - 1, window)
    start = jnp.asarray(start, jnp.int32)
    return {"window/start": start.astype(jnp.float32),
            "window/end": (start + w - 1).astype(jnp.float32),
            "window/sigma_start": s[start],
            "window/sigma_end": s[start + w]}


# ----------------------------------------------------------------------------- trained transitions
def num_window_train_timesteps(window: int, fraction: float) -> int:
    """``K = int(W * fraction)``: transitions trained per sample, all inside the window (MixGRPO
    trains the whole window: ``fraction = 1``). ``window`` must be the effective (non-zero) size."""
    w = int(window)
    k = int(w * float(fraction))
    if w < 1 or k < 1 or k > w:
        raise ConfigError(f"train fraction {fraction} of a {w}-transition SDE window trains {k} "
                          f"transitions per sample; need between 1 and {w}")
    return k


def window_train_timesteps(key: jax.Array, batch: int, start: jax.Array | int, window: int,
                           fraction: float) -> jax.Array:
    """``(B, K)`` int32: per sample, K distinct transitions of the window ``start..start+W-1`` in
    random order (a per-sample random permutation of the window truncated to K).

    ``window`` is the effective size (``effective_window(S, sde_window)``); ``start`` a scalar or a
    ``(B,)`` vector. With ``start = 0`` and ``window = S-1`` this is exactly
    ``rl.sample_train_timesteps(key, B, S, fraction)`` (same uniforms, same argsort)."""
    k = num_window_train_timesteps(window, fraction)
    u = jax.random.uniform(key, (int(batch), int(window)))
    offs = jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    return (start.reshape(start.shape + (1,) * (2 - start.ndim)) if start.ndim else start) + offs


def trained_sde_fraction(mask: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Share of the trained transitions ``(B, K)`` that were SDE steps in the rollout (must be 1:
    an ODE transition has log-prob 0 and a zero-std policy; log it as a guard)."""
    return jnp.mean(jnp.asarray(mask)[jnp.asarray(timesteps, jnp.int32)].astype(jnp.float32))


# ----------------------------------------------------------------------------- rollout
def _reduce(logp: jax.Array, reduction: str | None) -> jax.Array:
    """Same reductions as ``rl.reduce_logprob`` (channels last); local, so this module needs only
    ``rl.sde``."""
    if reduction is None:
        return logp
    if reduction == "position_sum":
        return jnp.sum(logp, axis=-1)
    if reduction == "sample_mean":
        return jnp.mean(logp, axis=tuple(range(1, logp.ndim)))
    raise ConfigError(f"logprob_reduction must be one of {LOGPROB_REDUCTIONS} or None, got {reduction!r}")


def _lam(sigma: jax.Array) -> jax.Array:
    """``log((1 - sigma) / sigma)`` with both logs kept finite (callers mask the ends)."""
    tiny = jnp.float32(1e-30)
    return jnp.log(jnp.maximum(1.0 - sigma, tiny)) - jnp.log(jnp.maximum(sigma, tiny))


def dpm2_step(x: jax.Array, m: jax.Array, m_prev: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
              sigma_prev: jax.Array, use_second_order: jax.Array) -> jax.Array:
    """One DPM-Solver++(2M) step (midpoint variant) in rectified-flow variables, float32.

    ``m = x - sigma v`` (data prediction at ``sigma``), ``m_prev`` the one at ``sigma_prev``;
    scalar sigmas. ``use_second_order`` False gives the first-order step, which equals Euler."""
    x, m, m_prev = (jnp.asarray(a, jnp.float32) for a in (x, m, m_prev))
    s, t, u = (jnp.asarray(a, jnp.float32) for a in (sigma, sigma_next, sigma_prev))
    ok = use_second_order & (u < 1.0) & (u > s) & (t > 0.0)
    h = _lam(t) - _lam(s)
    r = jnp.where(ok, (_lam(s) - _lam(u)) / jnp.where(ok, h, 1.0), 1.0)
    d1 = jnp.where(ok, (m - m_prev) / r, jnp.zeros_like(m))
    c = (1.0 - t) - t * (1.0 - s) / s
    return (t / s) * x + c * (m + 0.5 * d1)


def ab2_step(x: jax.Array, v: jax.Array, v_prev: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
             sigma_prev: jax.Array, use_second_order: jax.Array) -> jax.Array:
    """One variable-step Adams-Bashforth-2 step of ``dx/dsigma = v`` with the previous velocity.

    ``h = sigma_next - sigma``, ``h_prev = sigma - sigma_prev``:
    ``x' = x + h ((1 + h/(2 h_prev)) v - h/(2 h_prev) v_prev)``; Euler where
    ``use_second_order`` is False."""
    x, v, v_prev = (jnp.asarray(a, jnp.float32) for a in (x, v, v_prev))
    s, t, u = (jnp.asarray(a, jnp.float32) for a in (sigma, sigma_next, sigma_prev))
    h, hp = t - s, s - u
    ok = use_second_order & (hp < 0)
    c = jnp.where(ok, h / (2.0 * jnp.where(ok, hp, -1.0)), 0.0)
    return x + h * ((1.0 + c) * v - c * v_prev)


def rollout_windowed(velocity_fn: VelocityFn, x_init: jax.Array, cond: Any, sigmas: jax.Array,
                     eta: jax.Array | float, key: jax.Array, sde_mask: jax.Array, *,
                     ode_solver: str = "euler", logprob_fn: LogprobFn = transition_logprob,
                     logprob_reduction: str | None = None, history_across_sde: bool = False,
                     return_noise: bool = False, return_means: bool = False,
                     unroll: int = 1) -> dict[str, jax.Array]:
    """Sample ``S = len(sigmas) - 1`` steps; SDE (noise scale ``eta``) where ``sde_mask``, ODE elsewhere.

    ``sde_mask`` ``(S,)`` bool (traced is fine, see :func:`sde_mask`); its last entry is ignored
    (the last transition is always the ODE). The SDE noise of step ``i`` is
    ``normal(split(key, S)[i], x.shape)`` whether or not step ``i`` uses it, so a step's noise
    does not depend on the window. SDE steps are ``rl.sde.sde_step`` and their log-probs
    ``logprob_fn(x, v, x_next, sigma, sigma_next, eta)`` (default ``rl.sde.transition_logprob``,
    the function the policy update uses, so the on-policy ratio is 1); both with ``(B,)`` sigma
    vectors, as :func:`vipo_jax.rl.rollout.rollout`. ODE steps (``ode_solver`` "euler", "dpm2" or "ab2"):
    see the module docstring.

    Returns the dict of ``rl.rollout.rollout``: ``latents`` (S+1, B, ...), ``log_probs`` (S, B, ...)
    (0 wherever no SDE ran), ``x0`` (B, ...) the last step's clean prediction; plus ``noise``
    (S, B, ...) if ``return_noise`` and ``means`` (S, B, ...) if ``return_means``: the Gaussian
    mean of each SDE transition (the rollout policy's ``mu_old`` for RatioNorm) and the ODE result
    elsewhere."""
    if ode_solver not in ODE_SOLVERS:
        raise ConfigError(f"ode_solver must be one of {ODE_SOLVERS}, got {ode_solver!r}")
    x_init = jnp.asarray(x_init, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    if num_steps < 1:
        raise ConfigError(f"sigmas must have at least 2 entries, got shape {sigmas.shape}")
    mask = jnp.asarray(sde_mask, bool)
    if mask.shape != (num_steps,):
        raise ConfigError(f"sde_mask must have shape ({num_steps},), got {mask.shape}")
    mask = mask & (jnp.arange(num_steps) < num_steps - 1)
    batch = x_init.shape[0]
    etas = jnp.where(mask, jnp.asarray(eta, jnp.float32), jnp.float32(0.0))
    keys = jax.random.split(key, num_steps)

    if ode_solver == "euler":
        # The body of rl.rollout.rollout, step for step: an ODE step is an SDE step with eta = 0.
        def body(carry, inp):
            x, _ = carry
            s, sn, e, k = inp
            sb = jnp.full((batch,), s, jnp.float32)
            snb = jnp.full((batch,), sn, jnp.float32)
            eb = jnp.full((batch,), e, jnp.float32)
            v = jnp.asarray(velocity_fn(x, sb, cond), jnp.float32)
            noise = jax.random.normal(k, x.shape, jnp.float32)
            x_next, mean, _ = sde_step(x, v, sb, snb, eb, noise)
            lp = _reduce(logprob_fn(x, v, x_next, sb, snb, eb), logprob_reduction)
            x0 = x0_prediction(x, v, sb)
            out = (x_next, lp)
            if return_noise:
                out = out + (noise,)
            if return_means:
                out = out + (mean,)
            return (x_next, x0), out

        (_, x0), outs = jax.lax.scan(body, (x_init, x_init), (sigmas[:-1], sigmas[1:], etas, keys),
                                     unroll=unroll)
    else:
        idx = jnp.arange(num_steps)

        def body(carry, inp):
            x, _, hist, s_prev, have_prev = carry
            s, sn, e, k, is_sde, i = inp
            sb = jnp.full((batch,), s, jnp.float32)
            snb = jnp.full((batch,), sn, jnp.float32)
            eb = jnp.full((batch,), e, jnp.float32)
            v = jnp.asarray(velocity_fn(x, sb, cond), jnp.float32)
            noise = jax.random.normal(k, x.shape, jnp.float32)
            # SDE branch: exactly the Euler path's step and log-prob (the history is not read).
            x_sde, mean, _ = sde_step(x, v, sb, snb, eb, noise)
            lp = _reduce(logprob_fn(x, v, x_sde, sb, snb, eb), logprob_reduction)
            x0 = x0_prediction(x, v, sb)
            # ODE branch: a 2nd-order multistep step, first order where the history is unusable.
            second = have_prev & (i < num_steps - 1)
            if ode_solver == "dpm2":
                x_ode, out_hist = dpm2_step(x, x0, hist, s, sn, s_prev, second), x0
            else:
                x_ode, out_hist = ab2_step(x, v, hist, s, sn, s_prev, second), v
            x_next = jnp.where(is_sde, x_sde, x_ode)
            keep = jnp.logical_or(jnp.asarray(history_across_sde), ~is_sde)
            out = (x_next, lp)
            if return_noise:
                out = out + (noise,)
            if return_means:
                out = out + (jnp.where(is_sde, mean, x_ode),)
            return (x_next, x0, out_hist, s, keep), out

        init = (x_init, x_init, jnp.zeros_like(x_init), jnp.float32(1.0), jnp.asarray(False))
        (_, x0, _, _, _), outs = jax.lax.scan(
            body, init, (sigmas[:-1], sigmas[1:], etas, keys, mask, idx), unroll=unroll)

    result = {
        "latents": jnp.concatenate([x_init[None], outs[0]], axis=0),
        "log_probs": outs[1],
        "x0": x0,
    }
    j = 2
    if return_noise:
        result["noise"] = outs[j]
        j += 1
    if return_means:
        result["means"] = outs[j]
    return result

