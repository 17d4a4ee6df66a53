"""The optimisation loop both toy pretraining scripts use (``toy.pretrain``, ``toy.pretrain_video``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm


def vae_loss(m: nnx.Module, x: jax.Array, k: jax.Array) -> jax.Array:
    """L1 + L2 reconstruction of [0, 1] pixels through a sampled latent, plus a small KL term; the
    loss both toy VAEs (AutoencoderKL, Wan VAE) are trained with."""
    mean, logvar = m.encode(x * 2 - 1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k, mean.shape)
    rec = (m.decode(z) + 1) / 2
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1 - logvar)
    return jnp.mean(jnp.abs(rec - x)) + jnp.mean((rec - x) ** 2) + 1e-4 * kl


def fit(model: nnx.Module, loss_fn, make_batch, steps: int, lr: float, desc: str, wd: float = 0.0,
        ema_decay: float = 0.0) -> list[float]:
    """Adam(W) with warmup + cosine decay; ``loss_fn(model, *batch) -> scalar``. With ``ema_decay``
    the model ends holding the exponential moving average of its weights (better samples for a
    diffusion model at no extra compute)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(2, steps), lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=wd))
    # Plain jax.jit over the split state (not nnx.jit): the per-call graph traversal of nnx.jit costs
    # ~30 ms, 10-15% of a toy step on 2 cores.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params) if ema_decay else None

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, ema, i, *batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), *batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            d = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))  # short warm-up of the average
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt_state, ema, loss

    losses = []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=5)
    for i in bar:
        params, opt_state, ema, loss = step(params, opt_state, ema, i, *make_batch(i))
        losses.append(loss)  # a device scalar: reading it every step would stall the dispatch queue
        if i % 20 == 19:
            losses[-20:] = [float(v) for v in losses[-20:]]
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    losses = [float(v) for v in losses]
    nnx.update(model, ema if ema is not None else params)
    return losses
