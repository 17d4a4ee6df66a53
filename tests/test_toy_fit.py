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
