"""Group advantages and the ViPO clipped-surrogate loss (value and gradient) against numpy."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from tests.utils import assert_close
from vipo_jax import rl
from vipo_jax.errors import ConfigError

B, H, W, C = 4, 3, 5, 2
STATIC = ("logprob_reduction", "map_target", "clip_range", "adv_clip_max")


@functools.partial(jax.jit, static_argnames=STATIC)
def _loss_and_grad(lp_new, lp_old, adv, m, reward_coefs=None, **kw):
    def f(lpn):
        return rl.policy_loss(lpn, lp_old, adv, m, reward_coefs=reward_coefs, **kw)

    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(lp_new)
    return loss, metrics, g


# ----------------------------------------------------------------------------- numpy references
def np_group_adv(r, g, eps=1e-8):
    r = np.asarray(r, np.float64).reshape(-1, g, *np.shape(r)[1:])
    a = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1, *a.shape[2:])


def np_loss_grad(lp_new, lp_old, adv, m, reduction, map_target, eps, clip_max):
    """Loss and its analytic gradient w.r.t. the element-wise new log-probs (float64)."""
    lp_new, lp_old = np.asarray(lp_new, np.float64), np.asarray(lp_old, np.float64)
    b = lp_new.shape[0]
    if reduction == "position_sum":
        d = lp_new.sum(-1) - lp_old.sum(-1)  # (B, *P)
    else:
        d = (lp_new - lp_old).reshape(b, -1).mean(1)  # (B,)
    ratio = np.exp(d)
    adv = np.asarray(adv, np.float64)
    if map_target == "advantage" and m is not None:
        a = np.asarray(m, np.float64) * adv.reshape((b,) + (1,) * (m.ndim - 1))
    else:
        a = adv
    a = np.clip(a, -clip_max, clip_max)
    nd = max(a.ndim, ratio.ndim)
    r = ratio.reshape(ratio.shape + (1,) * (nd - ratio.ndim))
    a = a.reshape(a.shape + (1,) * (nd - a.ndim))
    unc, clp = -a * r, -a * np.clip(r, 1 - eps, 1 + eps)
    obj = np.maximum(unc, clp)
    n = obj.size
    inside = (r > 1 - eps) & (r < 1 + eps)
    dobj_dr = np.where((unc > clp) | inside, -a, 0.0) * np.ones_like(obj)
    dl_dr = (dobj_dr * r / n)  # d loss / d log-ratio, per broadcast element
    if reduction == "position_sum":
        g = np.broadcast_to(dl_dr.reshape(lp_new.shape[:-1])[..., None], lp_new.shape)
    else:
        per_sample = dl_dr.reshape(b, -1).sum(1) / (lp_new.size / b)
        g = np.broadcast_to(per_sample.reshape((b,) + (1,) * (lp_new.ndim - 1)), lp_new.shape)
    return obj.mean(), g, ratio


def make_case(seed, spread, shape=(B, H, W, C)):
    rng = np.random.default_rng(seed)
    lp_old = rng.standard_normal(shape).astype(np.float32) - 1.0
    # per-sample shift (moves the sample-mean ratio) plus per-element noise (moves per-position ratios)
    shift = rng.uniform(-spread, spread, (shape[0],) + (1,) * (len(shape) - 1))
    lp_new = (lp_old + shift + rng.uniform(-spread, spread, shape) / 2).astype(np.float32)
    adv = np.array([2.5, -1.5, 0.7, -8.0], np.float32)[: shape[0]]
    m = rng.uniform(0, 1, shape[:-1]).astype(np.float32)
    return lp_new, lp_old, adv, m


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_vs_numpy():
    r = np.random.default_rng(0).standard_normal(12).astype(np.float32)
    ours = rl.group_advantages(r, 4)
    err = assert_close(ours, np_group_adv(r, 4), rel=1e-6, what="group adv")
    assert err < 1e-5
    # each group of 4 has mean 0 and unbiased std 1 (up to eps)
    a = np.asarray(ours).reshape(3, 4)
    np.testing.assert_allclose(a.mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(a.std(1, ddof=1), 1, atol=1e-5)
    # a constant group gives zeros, not NaN
    np.testing.assert_array_equal(np.asarray(rl.group_advantages(np.ones(4), 2)), 0.0)
    with pytest.raises(ConfigError):
        rl.group_advantages(r, 5)
    with pytest.raises(ConfigError):
        rl.group_advantages(r, 1)


def test_combine_advantages_normalises_each_reward():
    rng = np.random.default_rng(1)
    vq, mq = rng.standard_normal(8), 10 * rng.standard_normal(8) + 3
    adv, coefs = rl.combine_advantages({"vq": vq, "mq": mq}, {"mq": 0.5, "vq": 1.0}, 4)
    assert adv.shape == (2, 8)
    assert_close(adv[0], np_group_adv(vq, 4), rel=1e-5)
    assert_close(adv[1], np_group_adv(mq, 4), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(coefs), [1.0, 0.5])
    with pytest.raises(ConfigError):
        rl.combine_advantages({"vq": vq}, {}, 4)


@pytest.mark.parametrize("stats", ["position", "group"])
def test_pixel_rewards_to_advantages_vs_numpy(stats):
    rng = np.random.default_rng(2)
    r, m = rng.standard_normal(8), rng.uniform(0, 1, (8, 3, 4))
    ours = rl.pixel_rewards_to_advantages(r, m, 4, stats=stats)
    pix = (m * r[:, None, None]).reshape(2, 4, 3, 4)
    axes = (1,) if stats == "position" else (1, 2, 3)
    ref = (pix - pix.mean(axes, keepdims=True)) / (pix.std(axes, ddof=1, keepdims=True) + 1e-8)
    assert_close(ours, ref.reshape(8, 3, 4), rel=1e-5, what=f"pixel reward adv ({stats})")


@pytest.mark.parametrize("group", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 1e3])
def test_all_equal_groups_get_exactly_zero_advantages(group, scale):
    """A saturated reward (every sample of a group scores the same) gives advantages of exactly 0 in
    float32, for every value, group size and scale (the plain formula's one-ulp-off mean divided by
    0 + 1e-8 gave |A| up to ~1); the other groups of the batch are unaffected."""
    rng = np.random.default_rng(group)
    values = (rng.uniform(-3, 3, 8) * scale).astype(np.float32)
    values[:3] = np.float32([0.1, 0.31, 0.7]) * np.float32(scale)
    equal = np.repeat(values, group)  # 8 groups, each all-equal
    mixed = np.concatenate([equal[:group], (rng.standard_normal(group) * scale).astype(np.float32)])
    np.testing.assert_array_equal(np.asarray(rl.group_advantages(equal, group)), 0.0)
    assert float(rl.degenerate_groups(equal, group)) == 8.0
    adv = np.asarray(rl.group_advantages(mixed, group))
    np.testing.assert_array_equal(adv[:group], 0.0)
    assert_close(adv[group:], np_group_adv(mixed[group:], group), rel=1e-5, what="the other group")
    assert float(rl.degenerate_groups(mixed, group)) == 1.0
    # the same for every reward of a multi-reward step, and for the map-on-reward advantages
    adv2, _ = rl.combine_advantages({"a": equal, "b": equal * 2}, {"a": 1.0, "b": 1.0}, group)
    np.testing.assert_array_equal(np.asarray(adv2), 0.0)
    # map on the reward, per position: equal rewards x the same map over the group's samples
    maps = np.broadcast_to(rng.uniform(0, 1, (1, 3, 4)), (len(equal), 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rl.pixel_rewards_to_advantages(equal, maps, group)), 0.0)


def test_a_nan_reward_stays_nan_in_its_group():
    """A NaN reward must reach the loss (the step then skips the update), not become a zero
    advantage of a "degenerate" group; the other groups are unaffected."""
    r = np.float32([0.1, np.nan, 0.3, 0.2, 0.5, 0.1, 0.4, 0.2])
    for adv in (rl.group_advantages(r, 4), rl.pixel_rewards_to_advantages(r, np.ones((8, 2), np.float32), 4),
                rl.pixel_rewards_to_advantages(r, np.ones((8, 2), np.float32), 4, stats="group")):
        adv = np.asarray(adv)
        assert np.all(np.isnan(adv[:4])) and np.all(np.isfinite(adv[4:]))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_near_ties_keep_their_differences(scale):
    """Rewards a few ulps apart: centred on a group member, the differences are exact, so the
    advantages match a float64 computation on the same float32 inputs."""
    base = np.float32(0.7 * scale)
    ulp = np.spacing(base)
    r = np.array([base + k * ulp for k in (0, 1, 3, 2, 0, 5, 1, 4)], np.float32)
    want = np_group_adv(r.astype(np.float64), 4)
    assert_close(rl.group_advantages(r, 4), want, rel=1e-5, what="near ties")


# ----------------------------------------------------------------------------- loss and gradient
@pytest.mark.parametrize("reduction", ["position_sum", "sample_mean"])
@pytest.mark.parametrize("use_map", [True, False])
@pytest.mark.parametrize("eps", [0.05, 1e-4])
def test_loss_and_grad_vs_numpy(reduction, use_map, eps):
    lp_new, lp_old, adv, m = make_case(3, 0.1)
    m_arg = m if use_map else None
    loss, metrics, g = _loss_and_grad(lp_new, lp_old, adv, m_arg, logprob_reduction=reduction,
                                      map_target="advantage", clip_range=eps, adv_clip_max=5.0)
    ref_loss, ref_g, ratio = np_loss_grad(lp_new, lp_old, adv, m_arg, reduction, "advantage", eps, 5.0)
    assert_close(loss, ref_loss, rel=1e-5, what="loss")
    assert_close(g, ref_g, rel=1e-5, what="grad")
    # both clip branches are exercised at eps=0.05
    frac = float(np.mean(np.abs(ratio - 1) > eps))
    assert 0 < frac < 1 or eps == 1e-4
    assert_close(metrics["clip_fraction"], frac, rel=1e-6)
    assert_close(metrics["ratio_mean"], ratio.mean(), rel=1e-5)
    assert_close(metrics["ratio_max"], ratio.max(), rel=1e-5)
    assert_close(metrics["approx_kl"], 0.5 * np.mean(np.log(ratio) ** 2), rel=1e-5)


def test_loss_grad_finite_differences():
    """Independent of the analytic formula: central differences in float64 of the numpy loss."""
    lp_new, lp_old, adv, m = make_case(4, 0.1)
    kw = dict(logprob_reduction="position_sum", map_target="advantage", clip_range=0.05, adv_clip_max=5.0)
    _, _, g = _loss_and_grad(lp_new, lp_old, adv, m, **kw)
    base = lp_new.astype(np.float64)
    for idx in [(0, 0, 0, 0), (1, 2, 4, 1), (3, 1, 2, 0), (2, 0, 3, 1)]:
        h = 1e-6
        up, dn = base.copy(), base.copy()
        up[idx] += h
        dn[idx] -= h
        fd = (np_loss_grad(up, lp_old, adv, m, "position_sum", "advantage", 0.05, 5.0)[0]
              - np_loss_grad(dn, lp_old, adv, m, "position_sum", "advantage", 0.05, 5.0)[0]) / (2 * h)
        assert abs(float(g[idx]) - fd) < 1e-6, (idx, float(g[idx]), fd)


@pytest.mark.parametrize("reduction", ["position_sum", "sample_mean"])
def test_reward_map_target_vs_numpy(reduction):
    lp_new, lp_old, _, m = make_case(5, 0.1)
    r = np.array([0.3, 1.2, -0.4, 0.9], np.float32)
    pix_adv = rl.pixel_rewards_to_advantages(r, m, 2)
    loss, _, g = _loss_and_grad(lp_new, lp_old, pix_adv, m, logprob_reduction=reduction,
                                map_target="reward", clip_range=0.05, adv_clip_max=5.0)
    ref_loss, ref_g, _ = np_loss_grad(lp_new, lp_old, np.asarray(pix_adv), None, reduction, "reward", 0.05, 5.0)
    assert_close(loss, ref_loss, rel=1e-5, what="loss (reward target)")
    assert_close(g, ref_g, rel=1e-5, what="grad (reward target)")


def test_uniform_psm_sample_mean_is_dancegrpo():
    """``psm aggregation=uniform`` + ``sample_mean`` is exactly DanceGRPO's loss."""
    lp_new, lp_old, adv, _ = make_case(6, 0.1)
    ones = rl.psm_map(np.zeros((B, 2, 2, 4), np.float32), (H, W), aggregation="uniform")
    kw = dict(logprob_reduction="sample_mean", map_target="advantage", clip_range=0.05, adv_clip_max=5.0)
    loss_u, _, g_u = _loss_and_grad(lp_new, lp_old, adv, ones, **kw)
    loss_n, _, g_n = _loss_and_grad(lp_new, lp_old, adv, None, **kw)
    # DanceGRPO: logp.mean over all non-batch dims, clamp(A, ±5), mean over batch of max(...)
    ratio = np.exp((lp_new.astype(np.float64) - lp_old).reshape(B, -1).mean(1))
    a = np.clip(adv.astype(np.float64), -5, 5)
    ref = np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 0.95, 1.05)))
    assert_close(loss_u, ref, rel=1e-5, what="uniform + sample_mean vs DanceGRPO")
    assert_close(loss_n, ref, rel=1e-5, what="no map + sample_mean vs DanceGRPO")
    assert_close(g_u, g_n, rel=1e-6, what="grad uniform vs none")


def test_ones_map_equals_no_map_position_sum():
    lp_new, lp_old, adv, _ = make_case(7, 0.1)
    kw = dict(logprob_reduction="position_sum", map_target="advantage", clip_range=0.05, adv_clip_max=5.0)
    l1, _, g1 = _loss_and_grad(lp_new, lp_old, adv, np.ones((B, H, W), np.float32), **kw)
    l0, _, g0 = _loss_and_grad(lp_new, lp_old, adv, None, **kw)
    assert_close(l1, l0, rel=1e-6)
    assert_close(g1, g0, rel=1e-6)


def test_sample_mean_map_scales_by_mean_map():
    """With one ratio per sample, the map only weights sample i by mean(M_i) (released Flux code),
    as long as no clamp is active."""
    lp_new, lp_old, _, m = make_case(8, 0.1)
    adv = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    kw = dict(logprob_reduction="sample_mean", map_target="advantage", clip_range=0.05, adv_clip_max=5.0)
    loss, _, _ = _loss_and_grad(lp_new, lp_old, adv, m, **kw)
    ratio = np.exp((lp_new.astype(np.float64) - lp_old).reshape(B, -1).mean(1))
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.95, 1.05))
    assert_close(loss, np.mean(m.reshape(B, -1).mean(1) * per), rel=1e-5)


def test_on_policy_ratio_one():
    lp_new, _, adv, m = make_case(9, 0.1)
    loss, metrics, g = _loss_and_grad(lp_new, lp_new, adv, m, logprob_reduction="position_sum",
                                      map_target="advantage", clip_range=1e-4, adv_clip_max=5.0)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) == 0.0
    assert float(metrics["ratio_max"]) == 1.0 == float(metrics["ratio_min"])
    a = np.clip(m * adv[:, None, None], -5, 5)
    assert_close(loss, -a.mean(), rel=1e-6)
    assert_close(metrics["adv_abs_mean"], np.abs(a).mean(), rel=1e-6)


def test_video_shapes():
    lp_new, lp_old, adv, m = make_case(10, 0.1, shape=(4, 2, 3, 3, 2))
    for red in ("position_sum", "sample_mean"):
        loss, _, g = _loss_and_grad(lp_new, lp_old, adv, m, logprob_reduction=red, map_target="advantage",
                                    clip_range=0.05, adv_clip_max=5.0)
        ref_loss, ref_g, _ = np_loss_grad(lp_new, lp_old, adv, m, red, "advantage", 0.05, 5.0)
        assert_close(loss, ref_loss, rel=1e-5, what=f"video loss {red}")
        assert_close(g, ref_g, rel=1e-5, what=f"video grad {red}")


def test_multi_reward_sum_of_losses():
    lp_new, lp_old, _, m = make_case(11, 0.1)
    rng = np.random.default_rng(11)
    adv, coefs = rl.combine_advantages({"vq": rng.standard_normal(B), "mq": rng.standard_normal(B)},
                                       {"vq": 1.0, "mq": 0.7}, 2)
    kw = dict(logprob_reduction="position_sum", map_target="advantage", clip_range=0.05, adv_clip_max=5.0)
    loss, metrics, g = _loss_and_grad(lp_new, lp_old, adv, m, reward_coefs=coefs, **kw)
    ref = [np_loss_grad(lp_new, lp_old, np.asarray(adv[i]), m, "position_sum", "advantage", 0.05, 5.0)
           for i in range(2)]
    assert_close(loss, ref[0][0] + 0.7 * ref[1][0], rel=1e-5)
    assert_close(g, ref[0][1] + 0.7 * ref[1][1], rel=1e-5)
    assert_close(metrics["loss_per_reward"], [ref[0][0], ref[1][0]], rel=1e-5)


def test_loss_rejects_bad_inputs():
    lp_new, lp_old, adv, m = make_case(12, 0.1)
    with pytest.raises(ConfigError):
        rl.policy_loss(lp_new, lp_old, adv, m[:, :2])
    with pytest.raises(ConfigError):
        rl.policy_loss(lp_new, lp_old, adv, m, map_target="reward")
    with pytest.raises(ConfigError):
        rl.policy_loss(lp_new, lp_old, adv, m, map_target="pixels")
    with pytest.raises(ConfigError):
        rl.policy_loss(lp_new, lp_old, adv, m, logprob_reduction="sum")
