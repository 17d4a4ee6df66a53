"""Rollout of the SDE sampler as one ``jax.lax.scan``.

The model is a plain callable ``velocity_fn(x, sigma, cond) -> v``: ``x`` is float32 in the model's
own latent layout (batch first, any trailing shape), ``sigma`` is a ``(B,)`` float32 vector (the
wrapper converts to the model's timestep convention, e.g. ``sigma*1000``), ``cond`` is any pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError
from vipo_jax.rl.logprob import VelocityFn, reduce_logprob
from vipo_jax.rl.sde import sde_step, transition_logprob, x0_prediction


def rollout(velocity_fn: VelocityFn, x_init: jax.Array, cond: Any, sigmas: jax.Array,
            eta: jax.Array | float, key: jax.Array, *, deterministic: bool = False,
            logprob_reduction: str | None = None, return_noise: bool = False,
            unroll: int = 1, stochastic_last: bool = False) -> dict[str, jax.Array]:
    """Sample ``S = len(sigmas) - 1`` steps from ``x_init`` (the state at ``sigmas[0]``).

    Steps ``0..S-2`` are SDE steps with noise scale ``eta``; the last step (to sigma=0) is never
    trained, so it is taken deterministically (ODE), which makes ``latents[S]`` equal the final
    clean prediction and keeps a zero-std step from producing inf log-probs. ``deterministic=True``
    uses the ODE for every step (evaluation). ``stochastic_last``: the last step is an SDE step too, as
    the official scripts sample it (it is still never trained, and the decoded output, the last
    step's clean prediction, does not depend on it). The SDE noise of step ``i`` is
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
        etas = jnp.full((num_steps,), eta, jnp.float32)
        if not stochastic_last:
            etas = etas.at[num_steps - 1].set(0.0)
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
