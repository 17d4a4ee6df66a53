"""Rollout of the SDE sampler as one ``jax.lax.scan``, and the RNG helpers of the GRPO recipe.

The model is a plain callable ``velocity_fn(x, sigma, cond) -> v``: ``x`` is float32 in the model's
own latent layout (batch first, any trailing shape), ``sigma`` is a ``(B,)`` float32 vector (the
wrapper converts to the model's timestep convention, e.g. ``sigma*1000``), ``cond`` is any pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.sde import sde_step, transition_logprob, x0_prediction

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


def rollout(velocity_fn: VelocityFn, x_init: jax.Array, cond: Any, sigmas: jax.Array,
            eta: jax.Array | float, key: jax.Array, *, deterministic: bool = False,
            logprob_reduction: str | None = None, return_noise: bool = False,
            unroll: int = 1) -> dict[str, jax.Array]:
    """Sample ``S = len(sigmas) - 1`` steps from ``x_init`` (the state at ``sigmas[0]``).

    Steps ``0..S-2`` are SDE steps with noise scale ``eta``; the last step (to sigma=0) is never
    trained, so it is taken deterministically (ODE), which makes ``latents[S]`` equal the final
    clean prediction and keeps a zero-std step from producing inf log-probs. ``deterministic=True``
    uses the ODE for every step (evaluation). The SDE noise of step ``i`` is
    ``normal(split(key, S)[i], x.shape)``.

    Returns a dict:
      ``latents``   (S+1, B, ...) float32, states x_0..x_S (x_0 = ``x_init``);
      ``log_probs`` (S, B, ...) log-prob of each transition under the sampling policy, element-wise
                    or reduced by ``logprob_reduction`` (see :func:`reduce_logprob`); 0 for
                    deterministic steps (the last one always);
      ``x0``        (B, ...) the clean prediction ``x_{S-1} - sigma_{S-1} v`` of the last step: the
                    output that is decoded for reward and PSM;
      ``noise``     (S, B, ...) the SDE noise, only if ``return_noise``.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    if num_steps < 1:
        raise ConfigError(f"sigmas must have at least 2 entries, got shape {sigmas.shape}")
    batch = x_init.shape[0]
    if deterministic:
        etas = jnp.zeros((num_steps,), jnp.float32)
    else:
        etas = jnp.full((num_steps,), eta, jnp.float32).at[num_steps - 1].set(0.0)
    keys = jax.random.split(key, num_steps)

    def body(carry, inp):
        x, _ = carry
        s, sn, e, k = inp
        # Per-sample (B,) sigmas here too: the training recomputation uses (B,) vectors, and the
        # same broadcast shapes give the same arithmetic, hence a ratio of exactly 1 on-policy.
        sb = jnp.full((batch,), s, jnp.float32)
        snb = jnp.full((batch,), sn, jnp.float32)
        eb = jnp.full((batch,), e, jnp.float32)
        v = jnp.asarray(velocity_fn(x, sb, cond), jnp.float32)
        noise = jax.random.normal(k, x.shape, jnp.float32)
        x_next, _, _ = sde_step(x, v, sb, snb, eb, noise)
        # Evaluated by the very function the policy update uses (see its barrier note).
        lp = reduce_logprob(transition_logprob(x, v, x_next, sb, snb, eb), logprob_reduction)
        x0 = x0_prediction(x, v, sb)
        out = (x_next, lp, noise) if return_noise else (x_next, lp)
        return (x_next, x0), out

    (_, x0), outs = jax.lax.scan(body, (x_init, x_init), (sigmas[:-1], sigmas[1:], etas, keys),
                                 unroll=unroll)
    result = {
        "latents": jnp.concatenate([x_init[None], outs[0]], axis=0),
        "log_probs": outs[1],
        "x0": x0,
    }
    if return_noise:
        result["noise"] = outs[2]
    return result


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


def gather_transitions(latents: jax.Array, log_probs: jax.Array, sigmas: jax.Array,
                       timesteps: jax.Array) -> dict[str, jax.Array]:
    """Pick each sample's trained transitions from a rollout, K-major for a scan over K.

    ``latents`` (S+1, B, ...), ``log_probs`` (S, B, ...), ``timesteps`` (B, K) int. Returns
    ``x``, ``x_next`` (K, B, ...), ``log_probs`` (K, B, ...), ``sigma``, ``sigma_next`` (K, B)."""
    t = jnp.asarray(timesteps, jnp.int32).T  # (K, B)
    b = jnp.arange(t.shape[1])[None, :]
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return {
        "x": latents[t, b],
        "x_next": latents[t + 1, b],
        "log_probs": log_probs[t, b],
        "sigma": sigmas[t],
        "sigma_next": sigmas[t + 1],
    }


def initial_noise(key: jax.Array, num_prompts: int, group_size: int,
                  shape: tuple[int, ...]) -> jax.Array:
    """``(num_prompts*group_size, *shape)`` float32 noise shared within each group.

    Prompt-major: sample ``b`` belongs to group ``b // group_size``; all G samples of a prompt start
    from the same noise (``init_same_noise``), so their reward differences come from the SDE
    noise only, which lowers the variance of the group-relative advantage."""
    noise = jax.random.normal(key, (int(num_prompts), *tuple(shape)), jnp.float32)
    return jnp.repeat(noise, int(group_size), axis=0)


def num_train_timesteps(num_steps: int, fraction: float) -> int:
    """``int((S-1)*fraction)``, the number of trained transitions per sample (Python arithmetic,
    as in DanceGRPO: 8 steps, 0.6 -> 4; 16 steps -> 9)."""
    k = int((int(num_steps) - 1) * float(fraction))
    if k < 1 or k > int(num_steps) - 1:
        raise ConfigError(
            f"timestep_fraction={fraction} with {num_steps} sampling steps trains {k} of the "
            f"{int(num_steps) - 1} trainable transitions; need between 1 and {int(num_steps) - 1}")
    return k


def sample_train_timesteps(key: jax.Array, batch: int, num_steps: int, fraction: float) -> jax.Array:
    """``(B, K)`` int32: for each sample independently, K distinct transitions among the first
    ``S-1`` (the last, sigma->0, is never trained), in random order (a per-sample random
    permutation truncated to K, as DanceGRPO's ``randperm(S-1)[:K]``)."""
    k = num_train_timesteps(num_steps, fraction)
    u = jax.random.uniform(key, (int(batch), int(num_steps) - 1))
    return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)
