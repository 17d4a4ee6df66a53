"""GRPO-Guard RatioNorm and gradient reweighting against numpy implementations of the formulas,
the Gaussian identity it rests on, and the exact on-policy ratio of 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.utils import assert_close
from vipo_jax.errors import ConfigError
from vipo_jax.rl import ratio_norm as RN
from vipo_jax.rl.schedule import sigma_schedule
from vipo_jax.rl.sde import sde_mean_std, transition_logprob


def np_ratio_norm(lpn, lpo, mn, mo, s, reduction):
    """log rho_hat = s * (R(lpn - lpo) + R((mn - mo)^2) / (2 s^2)), per sample s, float64."""
    lpn, lpo, mn, mo = (np.asarray(a, np.float64) for a in (lpn, lpo, mn, mo))
    s = np.asarray(s, np.float64)
    if reduction == "position_sum":
        red = lambda a: a.sum(-1)  # noqa: E731
    else:
        red = lambda a: a.reshape(a.shape[0], -1).mean(-1)  # noqa: E731
    lr, d2 = red(lpn - lpo), red((mn - mo) ** 2)
    s = s.reshape((-1,) + (1,) * (lr.ndim - 1))
    return s * (lr + d2 / (2 * s**2))


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 5)
    shape = (3, 4, 4, 2)
    lpn = jax.random.normal(k[0], shape)
    lpo = lpn + 0.05 * jax.random.normal(k[1], shape)
    mo = jax.random.normal(k[2], shape)
    mn = mo + 0.02 * jax.random.normal(k[3], shape)
    s = jnp.asarray([0.3, 0.05, 0.7], jnp.float32)
    return lpn, lpo, mn, mo, s


@pytest.mark.parametrize("reduction", ["position_sum", "sample_mean"])
@pytest.mark.parametrize("std_layout", ["vector", "bcast", "scalar"])
def test_matches_numpy_formula(data, reduction, std_layout):
    lpn, lpo, mn, mo, s = data
    std = {"vector": s, "bcast": s.reshape(3, 1, 1, 1), "scalar": jnp.float32(0.2)}[std_layout]
    ours = jax.jit(lambda *a: RN.ratio_norm_log_ratio(*a, reduction=reduction))(lpn, lpo, mn, mo, std)
    ref = np_ratio_norm(lpn, lpo, mn, mo, s if std_layout != "scalar" else np.full(3, 0.2), reduction)
    assert ours.shape == ref.shape
    assert_close(ours, ref, rel=1e-5, what=f"ratio_norm {reduction}")
    # the element-wise form reduces to the same thing (so it can be fed to rl.policy_loss as logp_new)
    el = RN.ratio_norm_elementwise(lpn, lpo, mn, mo, std)
    red = jnp.sum(el, -1) if reduction == "position_sum" else jnp.mean(el, (1, 2, 3))
    assert_close(red, ref, rel=1e-5)


def test_reference_implementation_form():
    """The public GRPO-Guard losses: per sample (log_prob = mean over elements) and one step scale
    s = sqrt_dt * std_dev_t: ratio = exp((lp - lp_old + mean(dmu^2) / (2 s^2)) * s)."""
    k = jax.random.split(jax.random.key(1), 4)
    shape = (4, 8, 8, 4)
    lpn, lpo = jax.random.normal(k[0], shape), jax.random.normal(k[1], shape)
    mo = jax.random.normal(k[2], shape)
    mn = mo + 0.1 * jax.random.normal(k[3], shape)
    sqrt_dt, std_dev_t = 0.25, 0.7
    scale = sqrt_dt * std_dev_t
    lp, lp_old = np.mean(np.asarray(lpn, np.float64), (1, 2, 3)), np.mean(np.asarray(lpo, np.float64), (1, 2, 3))
    bias = np.mean((np.asarray(mn, np.float64) - np.asarray(mo, np.float64)) ** 2, (1, 2, 3)) / (2 * scale**2)
    ref_ratio = np.exp((lp - lp_old + bias) * scale)
    ours = jnp.exp(RN.ratio_norm_log_ratio(lpn, lpo, mn, mo, jnp.float32(scale), reduction="sample_mean"))
    assert_close(ours, ref_ratio, rel=1e-5)


def _transition(key, batch=4, shape=(6, 6, 3), sigma=0.6, sigma_next=0.5, eta=0.8, drift=0.05):
    """Old/new velocities, the old policy's Gaussian transition and a sample from it."""
    k = jax.random.split(key, 4)
    x = jax.random.normal(k[0], (batch,) + shape)
    v_old = jax.random.normal(k[1], (batch,) + shape)
    v_new = v_old + drift * jax.random.normal(k[2], (batch,) + shape)
    sb, snb, eb = (jnp.full((batch,), a, jnp.float32) for a in (sigma, sigma_next, eta))
    m_old, std = sde_mean_std(x, v_old, sb, snb, eb)
    m_new, _ = sde_mean_std(x, v_new, sb, snb, eb)
    eps = jax.random.normal(k[3], x.shape)
    x_next = m_old + std * eps
    lp_old = transition_logprob(x, v_old, x_next, sb, snb, eb)
    lp_new = transition_logprob(x, v_new, x_next, sb, snb, eb)
    return lp_new, lp_old, m_new, m_old, std, eps


@pytest.mark.parametrize("reduction", ["position_sum", "sample_mean"])
def test_gaussian_identity(reduction):
    """For x' = mu_old + s*eps: log rho_hat = R(eps * (mu_new - mu_old)), zero-mean and step-free."""
    lpn, lpo, mn, mo, std, eps = _transition(jax.random.key(2))
    ours = RN.ratio_norm_log_ratio(lpn, lpo, mn, mo, std, reduction=reduction)
    prod = np.asarray(eps, np.float64) * (np.asarray(mn, np.float64) - np.asarray(mo, np.float64))
    ref = prod.sum(-1) if reduction == "position_sum" else prod.reshape(prod.shape[0], -1).mean(-1)
    # float32 log-probs of order 1/s^2 cancel: compare on the scale of the raw log-ratio
    raw = np.abs(np.asarray(lpn, np.float64) - np.asarray(lpo, np.float64)).max()
    assert np.max(np.abs(np.asarray(ours) - ref)) < 1e-5 * max(1.0, raw) * float(jnp.max(std))


def test_left_shift_removed_across_steps():
    """Raw log-ratio mean is -dmu^2/(2 s^2) (left-shifted, step-dependent); RatioNorm's is ~0."""
    sig = np.asarray(sigma_schedule(8, 3.0))
    raw_means, norm_means, norm_stds = [], [], []
    for i in (0, 3, 6):
        lpn, lpo, mn, mo, std, _ = _transition(jax.random.key(10 + i), batch=64, sigma=float(sig[i]),
                                               sigma_next=float(sig[i + 1]), drift=0.02)
        raw = np.asarray(lpn - lpo, np.float64)
        norm = np.asarray(RN.ratio_norm_elementwise(lpn, lpo, mn, mo, std), np.float64)
        d2 = (np.asarray(mn, np.float64) - np.asarray(mo, np.float64)) ** 2
        s2 = float(np.asarray(std).reshape(-1)[0]) ** 2
        assert_close(raw.mean(), -(d2 / (2 * s2)).mean(), rel=0.15, what="E[raw] = -dmu^2/(2s^2)")
        raw_means.append(raw.mean())
        norm_means.append(norm.mean())
        norm_stds.append(norm.std())
    assert all(m < 0 for m in raw_means)
    assert all(abs(m) < 0.1 * sd for m, sd in zip(norm_means, norm_stds))


def test_on_policy_ratio_is_exactly_one_and_gradient():
    """Before the first update the old values are the current ones (stop_gradient copies, as the
    train step does): normalised log-ratio exactly 0, ratio exactly 1; its gradient is s times the
    raw log-ratio's (the drift term has zero gradient at zero drift)."""
    x = jax.random.normal(jax.random.key(3), (3, 4, 4, 2))
    x_next = x + 0.1 * jax.random.normal(jax.random.key(4), x.shape)
    sig, sig_n, eta = jnp.asarray([0.9, 0.5, 0.2]), jnp.asarray([0.8, 0.4, 0.1]), 0.7
    params = {"w": jnp.asarray([0.3, -0.2]), "b": jnp.float32(0.1)}

    def vel(p):
        return lambda xx, s, c: p["w"] * xx * (1 + s[:, None, None, None]) + p["b"]

    def normed(p, red):
        lp, mean, std = RN.guard_transition(vel(p), x, x_next, sig, sig_n, eta, None)
        return RN.ratio_norm_log_ratio(lp, jax.lax.stop_gradient(lp), mean, jax.lax.stop_gradient(mean), std,
                                       reduction=red)

    for red in ("position_sum", "sample_mean"):
        lr = jax.jit(normed, static_argnums=1)(params, red)
        np.testing.assert_array_equal(np.asarray(lr), 0.0)
        np.testing.assert_array_equal(np.asarray(jnp.exp(lr)), 1.0)

    def raw_weighted(p):
        lp, _, std = RN.guard_transition(vel(p), x, x_next, sig, sig_n, eta, None)
        return jnp.sum(std * lp)

    g_norm = jax.grad(lambda p: jnp.sum(normed(p, "position_sum")))(params)
    g_raw = jax.grad(raw_weighted)(params)
    for k in params:
        assert_close(g_norm[k], g_raw[k], rel=1e-5, what=f"grad {k}")
        assert float(jnp.max(jnp.abs(g_norm[k]))) > 0


def test_guard_transition_is_the_rollout_expression():
    x = jax.random.normal(jax.random.key(5), (2, 3, 3, 2))
    x_next = x * 0.9
    vel = lambda xx, s, c: -0.5 * xx + s[:, None, None, None]  # noqa: E731
    lp, mean, std = RN.guard_transition(vel, x, x_next, 0.7, 0.6, 0.5, None)
    sb, snb, eb = jnp.full((2,), 0.7), jnp.full((2,), 0.6), jnp.full((2,), 0.5)
    v = vel(x, sb, None)
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(transition_logprob(x, v, x_next, sb, snb, eb)))
    m_ref, s_ref = sde_mean_std(x, v, sb, snb, eb)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(m_ref))
    np.testing.assert_array_equal(np.asarray(std), np.asarray(s_ref))


def test_zero_std_is_zero_and_finite_gradient():
    lpn = jnp.ones((2, 3, 1))
    mn = jnp.ones((2, 3, 1))
    out = RN.ratio_norm_elementwise(lpn, 0 * lpn, mn, 0 * mn, jnp.asarray([0.0, 0.5]))
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    g = jax.grad(lambda m: jnp.sum(RN.ratio_norm_elementwise(lpn, 0 * lpn, m, 0 * mn, jnp.asarray([0.0, 0.5]))))(mn)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g[0]) == 0)
    with pytest.raises(ConfigError):
        RN.ratio_norm_log_ratio(lpn, lpn, mn, mn, 0.1, reduction="sum")


def test_step_weight():
    sig = sigma_schedule(8, 3.0)
    s = np.asarray(sig, np.float64)
    t = jnp.asarray([0, 3, 6])
    w = RN.step_weight(sig[t], sig[t + 1])
    assert_close(w, 1.0 / (s[[0, 3, 6]] - s[[1, 4, 7]]), rel=1e-5)
    ref = RN.mean_step_weight(sig)
    assert_close(ref, np.mean(1.0 / (s[:-2] - s[1:-1])), rel=1e-5)
    wn = RN.step_weight(sig[t], sig[t + 1], reference=ref)
    assert_close(wn, np.asarray(w) / float(ref), rel=1e-6)
    all_w = RN.step_weight(sig[:-2], sig[1:-1], reference=ref)
    assert abs(float(jnp.mean(all_w)) - 1.0) < 1e-5
    assert float(RN.step_weight(jnp.float32(0.3), jnp.float32(0.3))) == 0.0
