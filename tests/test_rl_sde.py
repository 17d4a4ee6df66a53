"""Sigma schedule, SDE step / log-prob, rollout scan and the RNG helpers, against independent
numpy float64 implementations of docs/METHOD.md §1."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.utils import assert_close
from vipo_jax import rl
from vipo_jax.errors import ConfigError


# ----------------------------------------------------------------------------- numpy references
def np_sigmas(num_steps: int, shift: float) -> np.ndarray:
    u = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * u / (1.0 + (shift - 1.0) * u)


def np_sde(x, v, s, sn, eta):
    """docs/METHOD.md §1 in float64; s/sn/eta scalars or per-sample vectors."""
    x, v = x.astype(np.float64), v.astype(np.float64)
    shp = (-1,) + (1,) * (x.ndim - 1)
    s, sn, eta = (np.asarray(a, np.float64).reshape(shp) if np.ndim(a) else np.float64(a)
                  for a in (s, sn, eta))
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x + (sn - s) * v - 0.5 * eta**2 * score * (sn - s)
    std = eta * np.sqrt(s - sn)
    return mean, std * np.ones_like(x)


def np_logp(xn, mean, std):
    xn, mean, std = (np.asarray(a, np.float64) for a in (xn, mean, std))
    return -((xn - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("num_steps,shift", [(8, 3.0), (16, 8.0), (1, 1.0), (5, 0.5)])
def test_sigma_schedule(num_steps, shift):
    s = rl.sigma_schedule(num_steps, shift)
    assert s.shape == (num_steps + 1,) and s.dtype == jnp.float32
    err = assert_close(s, np_sigmas(num_steps, shift), rel=1e-7, what="sigmas")
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert np.all(np.diff(np.asarray(s)) < 0)
    assert err <= 1e-7


def test_sigma_schedule_rejects_bad_config():
    with pytest.raises(ConfigError):
        rl.sigma_schedule(0, 3.0)
    with pytest.raises(ConfigError):
        rl.sigma_schedule(8, 0.0)


# ----------------------------------------------------------------------------- SDE step
_sde_step = jax.jit(rl.sde_step)
_logprob = jax.jit(rl.sde_logprob)


@pytest.mark.parametrize("index", [0, 3, 6])
def test_sde_step_matches_numpy(index):
    rng = np.random.default_rng(index)
    sig = np_sigmas(8, 3.0)
    x = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    s, sn, eta = sig[index], sig[index + 1], 0.3
    x_next, mean, std = _sde_step(x, v, np.float32(s), np.float32(sn), np.float32(eta), noise)
    ref_mean, ref_std = np_sde(x, v, s, sn, eta)
    assert x_next.dtype == mean.dtype == jnp.float32
    assert_close(mean, ref_mean, rel=1e-5, what="mean")
    assert_close(jnp.broadcast_to(std, x.shape), ref_std, rel=1e-5, what="std")
    assert_close(x_next, ref_mean + ref_std * noise, rel=1e-5, what="x_next")
    lp = _logprob(x_next, mean, std)
    assert_close(lp, np_logp(np.asarray(x_next), ref_mean, ref_std), rel=1e-5, what="logp")


def test_sde_step_per_sample_sigmas_and_bf16():
    """Training batches mix timesteps: sigma, sigma_next are (B,) vectors. bf16 in, float32 out."""
    rng = np.random.default_rng(1)
    sig = np_sigmas(8, 3.0)
    idx = np.array([0, 2, 5])
    x = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    xb, vb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    x_next, mean, std = _sde_step(xb, vb, sig[idx].astype(np.float32), sig[idx + 1].astype(np.float32),
                                  np.float32(0.3), noise)
    assert x_next.dtype == jnp.float32 and std.shape == (3, 1, 1, 1)
    ref_mean, ref_std = np_sde(np.asarray(xb, np.float32), np.asarray(vb, np.float32), sig[idx],
                               sig[idx + 1], 0.3)
    assert_close(mean, ref_mean, rel=1e-5, what="mean")
    assert_close(jnp.broadcast_to(std, x.shape), ref_std, rel=1e-5, what="std")
    lp = jax.jit(rl.transition_logprob)(xb, vb, x_next, sig[idx], sig[idx + 1], 0.3)
    assert_close(lp, np_logp(np.asarray(x_next), ref_mean, ref_std), rel=1e-5, what="logp")


def test_ode_and_x0_prediction():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    assert_close(rl.x0_prediction(x, v, 0.7), x - 0.7 * v.astype(np.float64), rel=1e-6)
    assert_close(rl.ode_step(x, v, 0.7, 0.4), x + (0.4 - 0.7) * v.astype(np.float64), rel=1e-6)
    # the SDE with eta = 0 is the ODE
    x_next, mean, std = rl.sde_step(x, v, 0.7, 0.4, 0.0, np.ones_like(x))
    np.testing.assert_allclose(np.asarray(x_next), np.asarray(rl.ode_step(x, v, 0.7, 0.4)), atol=1e-6)


@jax.jit
def _step_lp_grad(x, v, xn, s, sn, eta):
    x_next, mean, std = rl.sde_step(x, v, s, sn, eta, jnp.ones_like(x))
    lp = rl.transition_logprob(x, v, xn, s, sn, eta)
    g = jax.grad(lambda vv: jnp.sum(rl.transition_logprob(x, vv, xn, s, sn, eta)))(v)
    return x_next, std, lp, g


def test_deterministic_and_last_steps_are_finite():
    """eta=0 (std 0), sigma_next=0 and even sigma=0 give finite values, log-probs and gradients."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    xn = x + 0.1
    for s, sn, eta in [(0.5, 0.2, 0.0), (0.3, 0.0, 0.3), (0.0, 0.0, 0.3), (0.3, 0.0, 0.0)]:
        x_next, std, lp, g = _step_lp_grad(x, v, xn, np.float32(s), np.float32(sn), np.float32(eta))
        for a in (x_next, lp, g):
            assert np.all(np.isfinite(np.asarray(a)))
        if eta == 0.0:
            assert float(jnp.max(jnp.abs(lp))) == 0.0
            assert float(jnp.max(jnp.abs(std))) == 0.0


# ----------------------------------------------------------------------------- rollout
def toy_velocity(x, sigma, cond):
    return jnp.tanh(x * cond["w"] + sigma[:, None, None, None]) - 0.5 * x + cond["b"]


_velocity = jax.jit(toy_velocity)
COND = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.float32), "b": jnp.float32(0.1)}


@pytest.fixture(scope="module")
def rollout_case():
    steps, eta = 5, 0.3
    sigmas = rl.sigma_schedule(steps, 3.0)
    x_init = rl.initial_noise(jax.random.key(0), 2, 3, (4, 4, 3))
    fn = jax.jit(lambda x, c, k: rl.rollout(toy_velocity, x, c, sigmas, eta, k, return_noise=True))
    out = fn(x_init, COND, jax.random.key(1))
    return steps, eta, sigmas, x_init, out


@jax.jit
def _loop_step(x, s, sn, e, noise):
    v = toy_velocity(x, jnp.full((x.shape[0],), s), COND)
    x_new, mean, std = rl.sde_step(x, v, s, sn, e, noise)
    return x_new, rl.sde_logprob(x_new, mean, std), rl.x0_prediction(x, v, s)


def test_rollout_equals_python_loop(rollout_case):
    steps, eta, sigmas, x_init, out = rollout_case
    assert out["latents"].shape == (steps + 1,) + x_init.shape
    assert out["log_probs"].shape == (steps,) + x_init.shape
    keys = jax.random.split(jax.random.key(1), steps)
    x = x_init
    for i in range(steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        noise = jax.random.normal(keys[i], x.shape, jnp.float32)
        np.testing.assert_array_equal(np.asarray(out["noise"][i]), np.asarray(noise))
        e = eta if i < steps - 1 else 0.0  # the last step is deterministic
        x_new, lp, x0 = _loop_step(x, np.float32(s), np.float32(sn), np.float32(e), noise)
        assert_close(out["latents"][i + 1], x_new, rel=1e-6, what=f"latents[{i + 1}]")
        assert_close(out["log_probs"][i], lp, rel=1e-5, what=f"logp[{i}]")
        if i == steps - 1:
            assert_close(out["x0"], x0, rel=1e-6, what="x0")
        x = out["latents"][i + 1]
    np.testing.assert_array_equal(np.asarray(out["log_probs"][-1]), 0.0)
    assert_close(out["latents"][-1], out["x0"], rel=1e-6, what="x_S == x0")
    np.testing.assert_array_equal(np.asarray(out["latents"][0]), np.asarray(x_init))


def test_rollout_deterministic_is_ode():
    sigmas = rl.sigma_schedule(4, 3.0)
    x_init = rl.initial_noise(jax.random.key(2), 1, 2, (3, 3, 3))
    out = rl.rollout(toy_velocity, x_init, COND, sigmas, 0.3, jax.random.key(3), deterministic=True)
    x = np.asarray(x_init, np.float64)
    s = np.asarray(sigmas, np.float64)
    for i in range(4):
        v = np.asarray(_velocity(out["latents"][i], jnp.full((2,), sigmas[i]), COND), np.float64)
        x = np.asarray(out["latents"][i], np.float64) + (s[i + 1] - s[i]) * v
        assert_close(out["latents"][i + 1], x, rel=1e-6)
    assert float(jnp.max(jnp.abs(out["log_probs"]))) == 0.0


def test_rollout_logprob_reductions(rollout_case):
    steps, eta, sigmas, x_init, out = rollout_case
    for red in ("position_sum", "sample_mean"):
        o = rl.rollout(toy_velocity, x_init, COND, sigmas, eta, jax.random.key(1), logprob_reduction=red)
        ref = jax.vmap(lambda lp, red=red: rl.reduce_logprob(lp, red))(out["log_probs"])
        assert_close(o["log_probs"], ref, rel=1e-6, what=red)
    np.testing.assert_allclose(np.asarray(rl.reduce_logprob(out["log_probs"][0], "sample_mean")),
                               np.asarray(out["log_probs"][0]).reshape(x_init.shape[0], -1).mean(1), rtol=1e-6)


def test_recomputed_logprob_gives_ratio_one(rollout_case):
    """Training recomputes logp of the stored transitions with the same parameters: ratio == 1."""
    steps, eta, sigmas, x_init, out = rollout_case
    ts = rl.sample_train_timesteps(jax.random.key(4), x_init.shape[0], steps, 0.6)
    tr = rl.gather_transitions(out["latents"], out["log_probs"], sigmas, ts)
    k = ts.shape[1]
    assert tr["x"].shape == (k,) + x_init.shape and tr["sigma"].shape == (k, x_init.shape[0])

    @jax.jit
    def recompute(tr):
        return jax.vmap(lambda x, xn, s, sn: rl.step_logprob(toy_velocity, x, xn, s, sn, eta, COND))(
            tr["x"], tr["x_next"], tr["sigma"], tr["sigma_next"])

    lp = recompute(tr)
    # a different batch structure (K, B) may fuse differently: equal up to float32 rounding
    diff = float(jnp.max(jnp.abs(lp - tr["log_probs"])))
    assert diff <= 1e-5, diff
    # the same (B,) structure as the rollout step: bit-identical, the ratio is exactly 1
    b = x_init.shape[0]
    same = jax.jit(lambda x, xn, s, sn: rl.step_logprob(toy_velocity, x, xn, s, sn, eta, COND))(
        out["latents"][1], out["latents"][2], jnp.full((b,), sigmas[1]), jnp.full((b,), sigmas[2]))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(out["log_probs"][1]))
    ratio = jnp.exp(rl.reduce_logprob(lp[0], "position_sum") - rl.reduce_logprob(tr["log_probs"][0],
                                                                                   "position_sum"))
    assert float(jnp.max(jnp.abs(ratio - 1.0))) <= 1e-4
    # gathered entries are the right ones
    t0, b0 = int(ts[1, 0]), 1
    np.testing.assert_array_equal(np.asarray(tr["x"][0, b0]), np.asarray(out["latents"][t0, b0]))
    np.testing.assert_array_equal(np.asarray(tr["x_next"][0, b0]), np.asarray(out["latents"][t0 + 1, b0]))
    assert float(tr["sigma"][0, b0]) == float(sigmas[t0])


# ----------------------------------------------------------------------------- RNG helpers
def test_initial_noise_shared_per_group():
    n = rl.initial_noise(jax.random.key(5), 3, 4, (2, 2, 3))
    assert n.shape == (12, 2, 2, 3) and n.dtype == jnp.float32
    a = np.asarray(n)
    for b in range(12):
        np.testing.assert_array_equal(a[b], a[(b // 4) * 4])
    assert not np.allclose(a[0], a[4]) and not np.allclose(a[4], a[8])


@pytest.mark.parametrize("num_steps,fraction,k", [(8, 0.6, 4), (16, 0.6, 9), (20, 0.6, 11), (8, 1.0, 7)])
def test_sample_train_timesteps(num_steps, fraction, k):
    assert rl.num_train_timesteps(num_steps, fraction) == k == int((num_steps - 1) * fraction)
    ts = np.asarray(rl.sample_train_timesteps(jax.random.key(6), 256, num_steps, fraction))
    assert ts.shape == (256, k) and ts.dtype == np.int32
    assert ts.min() >= 0 and ts.max() <= num_steps - 2  # never the last transition
    assert all(len(set(row)) == k for row in ts)  # without replacement
    assert len({tuple(row) for row in ts}) > 200  # independent per sample
    counts = np.bincount(ts.reshape(-1), minlength=num_steps - 1)
    expected = 256 * k / (num_steps - 1)
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))  # uniform over the S-1


def test_sample_train_timesteps_rejects_empty():
    with pytest.raises(ConfigError):
        rl.sample_train_timesteps(jax.random.key(0), 2, 2, 0.6)
