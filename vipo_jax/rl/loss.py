"""The ViPO policy objective (docs/METHOD.md §4): GRPO's clipped surrogate at every latent position.

``A^p = clip(M(p)*A, -adv_clip_max, adv_clip_max)`` and
``L = mean_{i,p} max(-A^p * rho^p, -A^p * clip(rho^p, 1-eps, 1+eps))`` with no KL term. The mean
over trained timesteps is the caller's (equal-sized terms, so the mean of per-step losses is the
mean over ``(i, t, p)``). Log-probs are element-wise, channels last: ``(B, H, W, C)`` for images,
``(B, T, H, W, C)`` for video; the map is ``(B, H, W)`` / ``(B, T, H, W)``.

Switches (the paper's ablations and the reference behaviours):
  ``logprob_reduction='position_sum'``: one ratio per latent position, logp summed over channels
    (the paper's formula, the official Wan code);
  ``logprob_reduction='sample_mean'``: one ratio per sample from the mean over all elements
    (DanceGRPO and the released Flux script, where the map only scales a sample by mean(M));
  ``map_target='advantage'`` (the method) or ``'reward'`` (advantages already come per position
    from :func:`vipo_jax.rl.advantages.pixel_rewards_to_advantages`; the map is not applied again);
  ``psm_map=None`` is plain GRPO (``M = 1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.logprob import reduce_logprob

MAP_TARGETS = ("advantage", "reward")


def _expand_to(a: jax.Array, ndim: int) -> jax.Array:
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def pixel_advantages(advantages: jax.Array, psm_map: jax.Array | None, *, map_target: str = "advantage",
                     adv_clip_max: float = 5.0) -> jax.Array:
    """Per-position advantages ``clip(M*A, ±adv_clip_max)`` (or ``clip(A)`` without a map).

    ``advantages`` (B,) for ``map_target='advantage'``; (B, *P) already per position for ``'reward'``
    (then ``psm_map`` has been used on the reward and is ignored here)."""
    a = jnp.asarray(advantages, jnp.float32)
    if map_target == "advantage":
        if a.ndim != 1:
            raise ConfigError(f"map_target='advantage' needs scalar advantages (B,), got shape {a.shape}")
        if psm_map is not None:
            m = jax.lax.stop_gradient(jnp.asarray(psm_map, jnp.float32))
            a = m * _expand_to(a, m.ndim)
    elif map_target == "reward":
        if a.ndim < 2:
            raise ConfigError("map_target='reward' needs per-position advantages (B, *P) from "
                              f"pixel_rewards_to_advantages, got shape {a.shape}")
    else:
        raise ConfigError(f"map_target must be one of {MAP_TARGETS}, got {map_target!r}")
    return jnp.clip(a, -adv_clip_max, adv_clip_max)


def clipped_surrogate(logp_new: jax.Array, logp_old: jax.Array, adv: jax.Array,
                      clip_range: float = 1e-4) -> jax.Array:
    """Mean of ``max(-A*rho, -A*clip(rho, 1±eps))`` for already-reduced log-probs.

    ``logp_*`` are ``(B,)`` (one ratio per sample) or ``(B, *P)`` (per position); ``adv`` is ``(B,)``
    or ``(B, *P)``; the two broadcast against each other from the batch axis."""
    ratio = jnp.exp(jnp.asarray(logp_new, jnp.float32) - jax.lax.stop_gradient(
        jnp.asarray(logp_old, jnp.float32)))
    adv = jax.lax.stop_gradient(jnp.asarray(adv, jnp.float32))
    nd = max(ratio.ndim, adv.ndim)
    ratio, adv = _expand_to(ratio, nd), _expand_to(adv, nd)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.mean(jnp.maximum(unclipped, clipped))


def policy_loss(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array,
                psm_map: jax.Array | None = None, *, logprob_reduction: str = "position_sum",
                map_target: str = "advantage", clip_range: float = 1e-4, adv_clip_max: float = 5.0,
                reward_coefs: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ViPO loss for one trained timestep of a batch; returns ``(loss, metrics)``.

    ``logp_new`` / ``logp_old``: element-wise log-probs ``(B, *P, C)`` of the same transitions under
    the current and the rollout policy. ``advantages``: ``(B,)`` (or ``(B, *P)`` for
    ``map_target='reward'``); with ``reward_coefs`` (R,) a leading reward axis ``(R, ...)`` and the
    loss is ``sum_r coef_r * L(A_r)`` (multi-reward, each advantage clamped separately).
    Metrics (no gradient): ``clip_fraction`` (share of ratios outside 1±eps), ``approx_kl``
    (``0.5*mean(dlogp^2)``), ``ratio_mean/max/min``, ``adv_abs_mean``, ``map_mean``."""
    logp_new = jnp.asarray(logp_new, jnp.float32)
    logp_old = jnp.asarray(logp_old, jnp.float32)
    if logp_new.shape != logp_old.shape:
        raise ConfigError(f"logp_new {logp_new.shape} and logp_old {logp_old.shape} differ")
    if psm_map is not None and tuple(psm_map.shape) != tuple(logp_new.shape[:-1]):
        raise ConfigError(f"psm_map shape {tuple(psm_map.shape)} must be the log-prob shape without "
                          f"channels {tuple(logp_new.shape[:-1])}")
    lr_new = reduce_logprob(logp_new, logprob_reduction)
    lr_old = reduce_logprob(logp_old, logprob_reduction)

    def one(adv):
        pa = pixel_advantages(adv, psm_map, map_target=map_target, adv_clip_max=adv_clip_max)
        return clipped_surrogate(lr_new, lr_old, pa, clip_range), jnp.mean(jnp.abs(pa))

    if reward_coefs is None:
        loss, adv_abs = one(advantages)
        per_reward = None
    else:
        coefs = jnp.asarray(reward_coefs, jnp.float32)
        adv = jnp.asarray(advantages, jnp.float32)
        if adv.shape[0] != coefs.shape[0]:
            raise ConfigError(f"advantages {adv.shape} need a leading reward axis of {coefs.shape[0]}")
        losses, adv_abs_r = [], []
        for r in range(coefs.shape[0]):
            lr, aa = one(adv[r])
            losses.append(lr)
            adv_abs_r.append(aa)
        per_reward = jnp.stack(losses)
        loss = jnp.sum(coefs * per_reward)
        adv_abs = jnp.mean(jnp.stack(adv_abs_r))

    d = jax.lax.stop_gradient(lr_new - lr_old)
    ratio = jnp.exp(d)
    metrics = {
        "policy_loss": jax.lax.stop_gradient(loss),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
        "approx_kl": 0.5 * jnp.mean(d * d),
        "ratio_mean": jnp.mean(ratio),
        "ratio_max": jnp.max(ratio),
        "ratio_min": jnp.min(ratio),
        "adv_abs_mean": jax.lax.stop_gradient(adv_abs),
        "map_mean": (jnp.mean(jnp.asarray(psm_map, jnp.float32)) if psm_map is not None
                     else jnp.float32(1.0)),
    }
    if per_reward is not None:
        metrics["loss_per_reward"] = jax.lax.stop_gradient(per_reward)
    return loss, metrics
