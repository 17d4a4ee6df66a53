"""The jitted ViPO step on a tiny synthetic world (an MLP velocity field, a fixed linear decoder,
redness reward, random-projection patch features): fast, and independent of the model ports."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vipo_jax.rewards.pixels import redness
from vipo_jax.training.run import init_state
from vipo_jax.training.step import make_sampler, make_train_step
from vipo_jax.training.step_config import StepConfig

H = W = 8
C = 4
LATENT = (H, W, C)


class Velocity(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(C + 1 + 4, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, C, rngs=rngs)

    def __call__(self, x, sigma, cond):
        b = x.shape[0]
        feats = jnp.concatenate([x, jnp.broadcast_to(sigma[:, None, None, None], (b, H, W, 1)),
                                 jnp.broadcast_to(cond["emb"][:, None, None, :], (b, H, W, 4))], -1)
        return self.l2(jax.nn.gelu(self.l1(feats)))


DECODER = jax.random.normal(jax.random.PRNGKey(7), (C, 3)) * 0.8
PROJ = jax.random.normal(jax.random.PRNGKey(8), (3, 16))


def decode_fn(frozen, x0):
    img = jax.nn.sigmoid(x0 @ frozen["dec"])
    return jax.image.resize(img, (x0.shape[0], 2 * H, 2 * W, 3), "nearest")


def feature_fn(frozen, images, latents=None):
    b = images.shape[0]
    patches = images.reshape(b, 8, 2, 8, 2, 3).mean((2, 4))
    return jnp.tanh(patches @ frozen["proj"])


def make(cfg_over=None, reward=None, opt=None):
    model = Velocity(nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def velocity_fn(p, x, sigma, cond):
        return nnx.merge(graphdef, p)(x, sigma, cond)

    cfg = StepConfig(num_steps=6, shift=3.0, eta=0.3, group_size=4, **(cfg_over or {}))
    cfg = dataclasses.replace(cfg, rewards=(("redness", 1.0),))
    opt = opt or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=1e-4))
    rfn = reward or (lambda frozen, images, batch: redness(images))
    step = make_train_step(cfg, velocity_fn=velocity_fn, decode_fn=decode_fn, reward_fns={"redness": rfn},
                           feature_fn=feature_fn, optimizer=opt, latent_shape=LATENT)
    state = init_state(params, opt, seed=0)
    frozen = {"dec": DECODER, "proj": PROJ}
    batch = {"cond": {"emb": jax.random.normal(jax.random.PRNGKey(3), (2, 4))}}
    return jax.jit(step, donate_argnums=0), state, frozen, batch, velocity_fn


@pytest.mark.parametrize("over", [{}, {"logprob_reduction": "sample_mean"}, {"num_updates": 2, "micro_batch": 2},
                                  {"init_same_noise": False},
                                  {"psm": None}, {"map_target": "reward"},
                                  {"sde_window": 2, "num_updates": 2},
                                  {"sde_window": 3, "window_schedule": "random", "ode_solver": "dpm2"},
                                  {"ode_solver": "ab2", "sde_window": 2, "window_fraction": 0.5},
                                  {"ratio_norm": True, "num_updates": 2},
                                  {"ratio_norm": True, "ratio_norm_reweight": False,
                                   "logprob_reduction": "sample_mean"},
                                  {"ratio_norm": True, "sde_window": 2, "map_target": "reward"}])
def test_ratio_is_exactly_one_before_the_first_update(over):
    step, state, frozen, batch, _ = make(over)
    state, m = step(state, frozen, batch)
    assert float(m["ratio_dev_first_update"]) == 0.0
    # the rollout's own log-probs agree with the training recomputation (used by later updates)
    assert float(m["logp/rollout_gap"]) < 1e-4
    assert float(m["updates_skipped"]) == 0.0
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_reward_rises_and_state_advances():
    step, state, frozen, batch, _ = make()
    first = None
    for _ in range(40):
        state, m = step(state, frozen, batch)
        first = first if first is not None else float(m["reward/redness"])
    assert int(state["step"]) == 40
    assert float(m["reward/redness"]) > first + 0.05, (first, float(m["reward/redness"]))


def test_nonfinite_reward_skips_the_update_and_counts():
    step, state, frozen, batch, _ = make(reward=lambda frozen, images, batch: redness(images) * jnp.nan)
    before = jax.tree.map(np.array, state["params"])
    for i in range(3):
        state, m = step(state, frozen, batch)
        assert float(m["updates_skipped"]) == 1.0
        assert float(m["nonfinite_streak"]) == i + 1
    after = jax.tree.map(np.array, state["params"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_overflowing_update_is_skipped_though_loss_and_gradient_are_finite():
    """A finite gradient times a huge step (here an update scaled past float32's range) must not
    reach the parameters or the optimizer state: the new state is checked before it is kept."""
    opt = optax.chain(optax.adam(1e-3), optax.scale(1e39))
    step, state, frozen, batch, _ = make(opt=opt)
    before = jax.tree.map(np.array, (state["params"], state["opt_state"]))
    state, m = step(state, frozen, batch)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["updates_skipped"]) == 1.0 and float(m["nonfinite_streak"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state["params"], state["opt_state"]))):
        np.testing.assert_array_equal(a, b)


def test_sampler_is_deterministic_ode():
    _, state, frozen, batch, velocity_fn = make()
    sample = jax.jit(make_sampler(velocity_fn, decode_fn, num_steps=6, shift=3.0))
    noise = jax.random.normal(jax.random.PRNGKey(5), (2,) + LATENT)
    a = sample(state["params"], frozen, batch["cond"], noise)
    b = sample(state["params"], frozen, batch["cond"], noise)
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sliding_window_moves_and_trains_only_its_sde_transitions():
    """MixGRPO's window in the step: it slides one transition per iteration (window_every 1) over the
    first S-1 = 5 transitions and rolls back; every trained transition was an SDE step."""
    step, state, frozen, batch, _ = make({"sde_window": 2, "window_every": 1})
    starts = []
    for _ in range(5):
        state, m = step(state, frozen, batch)
        starts.append(int(m["window/start"]))
        assert float(m["window/trained_sde_fraction"]) == 1.0
        assert float(m["ratio_dev_first_update"]) == 0.0
    assert starts == [0, 1, 2, 3, 0]
