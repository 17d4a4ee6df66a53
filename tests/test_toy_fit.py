"""The toy pretraining loop (``vipo_jax.toy.fit``): it fits, and with ``ema_decay`` the model ends
holding the moving average of its weights rather than the last ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.toy.fit import fit


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(3, 2)).astype(np.float32)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    return x, x @ w_true, w_true


def test_fit_reduces_the_loss_and_updates_the_model():
    x, y, w_true = _problem()
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def loss_fn(m, xb, yb):
        return jnp.mean((m(xb) - yb) ** 2)

    losses = fit(model, loss_fn, lambda i: (x, y), 300, 0.05, "test")
    assert len(losses) == 300 and all(isinstance(v, float) for v in losses)
    assert losses[-1] < 0.05 * losses[0]
    assert float(loss_fn(model, x, y)) < 0.05 * losses[0]  # the model holds the trained weights
    np.testing.assert_allclose(np.asarray(model.kernel[...]), w_true, atol=0.1)


def test_fit_with_ema_leaves_the_average_in_the_model():
    x, y, _ = _problem(1)
    a = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    b = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def loss_fn(m, xb, yb):
        return jnp.mean((m(xb) - yb) ** 2)

    fit(a, loss_fn, lambda i: (x, y), 40, 0.05, "plain")
    fit(b, loss_fn, lambda i: (x, y), 40, 0.05, "ema", ema_decay=0.9)
    ka, kb = np.asarray(a.kernel[...]), np.asarray(b.kernel[...])
    assert np.isfinite(kb).all() and not np.allclose(ka, kb)  # same trajectory, averaged weights differ
    assert jax.tree.structure(nnx.state(a)) == jax.tree.structure(nnx.state(b))


def test_vae_loss_matches_the_formula():
    """vae_loss = L1 + L2 of the reconstruction + 1e-4 KL; checked on an identity "VAE" whose
    latent noise is switched off (logvar -> -inf would give z = mean) and on a scaled one."""
    from vipo_jax.toy.fit import vae_loss

    class Scaled:
        def encode(self, y):
            return 0.5 * y, jnp.full(y.shape, -30.0)  # std e^-15: z is the mean

        def decode(self, z):
            return z  # rec = (0.5 (2x - 1) + 1) / 2 = 0.5 x + 0.25

    x = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    got = float(vae_loss(Scaled(), jnp.asarray(x), jax.random.PRNGKey(0)))
    rec = 0.5 * x + 0.25
    mean, logvar = 0.5 * (2 * x - 1), -30.0
    kl = 0.5 * np.mean(mean**2 + np.exp(logvar) - 1 - logvar)
    want = np.mean(np.abs(rec - x)) + np.mean((rec - x) ** 2) + 1e-4 * kl
    assert abs(got - want) < 1e-5 * max(1.0, abs(want))
