"""The Perceptual Structuring Module against an independent reference: sklearn PCA, scipy
gaussian_filter and torch F.interpolate (bilinear, antialias), written as the official code does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from sklearn.decomposition import PCA

from tests.utils import assert_close
from vipo_jax import rl
from vipo_jax.errors import ConfigError
from vipo_jax.rl.psm import PSMOptions

_psm = jax.jit(rl.psm_map, static_argnames=("latent_hw", "options"))
_psm_video = jax.jit(rl.psm_map_video, static_argnames=("latent_thw", "options"))


# ----------------------------------------------------------------------------- reference
def ref_patch_scores(feats: np.ndarray, k: int, sign_rule: str):
    """sklearn PCA scores and explained-variance ratios of one image, with the chosen sign."""
    h, w, d = feats.shape
    x = feats.reshape(h * w, d).astype(np.float64)
    pca = PCA(n_components=k)
    z = pca.fit_transform(x)
    assert pca._fit_svd_solver in ("full", "covariance_eigh")  # exact solver, no randomness
    if sign_rule == "sklearn_u":  # largest-|score| token positive (sklearn <= 1.4)
        z = z * np.sign(z[np.argmax(np.abs(z), axis=0), np.arange(k)])
    elif sign_rule == "border":
        border = np.zeros((h, w), bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        s = np.sign(z[border.reshape(-1)].mean(0))
        z = z * np.where(s == 0, 1.0, s)
    # "sklearn_v": sklearn's own sign (>= 1.5 flips by loadings)
    return z, pca.explained_variance_ratio_


def ref_reverse(c):
    mn, mx = c.min(), c.max()
    return (mx - c) / (mx - mn) if mx != mn else np.full_like(c, 0.5)


def ref_resize(m: np.ndarray, size) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(m, np.float64))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False,
                                          antialias=True)
    return out[0, 0].numpy()


def ref_map(feats, latent_hw, k=3, sign_rule="border", aggregation="weighted", sigma=1.0,
            resize=ref_resize):
    """The official ``compute_dinov2_feature_map_reverse`` per frame, with an explicit sign."""
    h, w, _ = feats.shape
    z, lam = ref_patch_scores(feats, k, sign_rule)
    if aggregation == "weighted":
        wts = sum(lam[j] * ref_reverse(z[:, j]) for j in range(k))
    elif aggregation == "average":
        wts = ref_reverse(z.mean(1))
    else:
        wts = ref_reverse(z[:, 0])
    m = np.clip(wts, 0, 1).reshape(h, w)
    m = ndi.gaussian_filter(m, sigma=sigma)
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    m = resize(m, latent_hw)
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def structured_features(rng, b, h, w, d=16, rank=4, noise=0.05):
    """Low-rank token features with well separated singular values (stable PCA order and signs)."""
    scales = np.array([3.0, 2.0, 1.3, 0.8, 0.5][:rank])
    out = []
    for _ in range(b):
        z = rng.standard_normal((h * w, rank)) * scales
        basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
        out.append((z @ basis + noise * rng.standard_normal((h * w, d)) + rng.standard_normal(d))
                   .reshape(h, w, d))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def feats():
    # seed 7: the three sign rules orient some component differently on both images
    return structured_features(np.random.default_rng(7), 2, 6, 7)


def test_fixture_separates_sign_rules(feats):
    """Otherwise the sign-rule parametrisation below would not test anything."""
    for f in feats:
        maps = {r: ref_map(f, (6, 7), sign_rule=r, resize=lambda m, s: m)
                for r in ("border", "sklearn_u", "sklearn_v")}
        assert np.abs(maps["border"] - maps["sklearn_u"]).max() > 0.1
        assert np.abs(maps["border"] - maps["sklearn_v"]).max() > 0.1
        assert np.abs(maps["sklearn_u"] - maps["sklearn_v"]).max() > 0.1


# ----------------------------------------------------------------------------- static operators
@pytest.mark.torch
@pytest.mark.parametrize("hw,size", [((6, 7), (16, 12)), ((16, 16), (6, 5)), ((5, 13), (11, 4)),
                                     ((7, 9), (7, 9)), ((36, 36), (64, 64)), ((17, 29), (30, 52))])
def test_resize_matches_torch_antialias(torch, hw, size):
    x = np.random.default_rng(1).random((2,) + hw).astype(np.float32)
    ours = jax.jit(rl.resize_bilinear_antialias, static_argnums=1)(x, size)
    ref = np.stack([ref_resize(a.astype(np.float64), size) for a in x])
    assert_close(ours, ref, rel=1e-6, what=f"resize {hw}->{size}")


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_gaussian_matches_scipy(sigma):
    """Including a grid smaller than the kernel radius (reflect repeats with period 2n)."""
    x = np.random.default_rng(2).random((2, 3, 9)).astype(np.float32)
    ours = rl.gaussian_smooth_2d(x, sigma)
    ref = np.stack([ndi.gaussian_filter(a.astype(np.float64), sigma) for a in x])
    assert_close(ours, ref, rel=1e-6, what=f"gaussian sigma={sigma}")


def test_identity_operators():
    np.testing.assert_array_equal(rl.antialias_resize_matrix(7, 7), np.eye(7))
    np.testing.assert_array_equal(rl.linear_resize_matrix(5, 5), np.eye(5))
    np.testing.assert_array_equal(rl.gaussian_filter_matrix(4, 0.0), np.eye(4))


def test_sklearn_installed_flips_by_loadings():
    """The installed sklearn (1.5+ like the official env) makes the largest-|loading| entry of each
    component positive: our ``sklearn_v`` rule is its sign convention."""
    f = structured_features(np.random.default_rng(3), 1, 6, 7)[0].reshape(42, -1).astype(np.float64)
    pca = PCA(n_components=3).fit(f)
    v = pca.components_
    assert np.all(v[np.arange(3), np.argmax(np.abs(v), axis=1)] > 0)


# ----------------------------------------------------------------------------- the map vs reference
@pytest.mark.torch
@pytest.mark.parametrize("sign_rule", ["border", "sklearn_u", "sklearn_v"])
@pytest.mark.parametrize("aggregation", ["weighted", "average", "first_pc"])
def test_psm_matches_reference(torch, feats, sign_rule, aggregation):
    opt = PSMOptions(sign_rule=sign_rule, aggregation=aggregation)
    ours = _psm(feats, (16, 12), opt)
    ref = np.stack([ref_map(f, (16, 12), 3, sign_rule, aggregation) for f in feats])
    err = assert_close(ours, ref, rel=1e-5, what=f"psm {sign_rule}/{aggregation}")
    assert ours.shape == (2, 16, 12) and err < 1e-5


@pytest.mark.torch
@pytest.mark.parametrize("k,sigma,latent", [(1, 1.0, (4, 5)), (4, 0.5, (9, 9)), (3, 0.0, (12, 14)),
                                            (3, 2.0, (3, 10))])
def test_psm_matches_reference_options(torch, feats, k, sigma, latent):
    """Other K, smoothing off/weak/strong, downsampling and mixed resizes."""
    opt = PSMOptions(num_components=k, smooth_sigma=sigma, sign_rule="sklearn_v")
    ours = _psm(feats, latent, opt)
    ref = np.stack([ref_map(f, latent, k, "sklearn_v", "weighted", sigma) for f in feats])
    assert_close(ours, ref, rel=1e-5, what=f"psm k={k} sigma={sigma} {latent}")


def test_psm_matches_reference_without_torch(feats):
    """Latent grid == patch grid: the antialiased resize is the identity, no torch needed."""
    ours = _psm(feats, (6, 7), PSMOptions())
    ref = np.stack([ref_map(f, (6, 7), resize=lambda m, s: m) for f in feats])
    assert_close(ours, ref, rel=1e-5, what="psm identity resize")
    assert float(jnp.min(ours)) == 0.0 and abs(float(jnp.max(ours)) - 1.0) < 1e-6


# ----------------------------------------------------------------------------- properties
def subject_features(rng, h, w, lo, hi, d=16, noise=0.05):
    bg, fg = rng.standard_normal(d), rng.standard_normal(d)
    f = np.tile(bg, (h, w, 1)) + noise * rng.standard_normal((h, w, d))
    f[lo:hi, lo:hi] = fg + noise * rng.standard_normal((hi - lo, hi - lo, d))
    mask = np.zeros((h, w), bool)
    mask[lo:hi, lo:hi] = True
    return f.astype(np.float32), mask


@pytest.mark.parametrize("lo,hi", [(3, 7), (1, 9)])  # small subject (16%) and large one (64%)
def test_border_rule_weights_the_subject(lo, hi):
    rng = np.random.default_rng(4)
    pairs = [subject_features(rng, 10, 10, lo, hi) for _ in range(2)]
    f = np.stack([p[0] for p in pairs])
    mask = pairs[0][1]
    for feats in (f, -f):  # invariant to the arbitrary feature polarity
        m = np.asarray(_psm(feats, (10, 10), PSMOptions()))
        for i in range(2):
            assert m[i][mask].mean() > 0.75 and m[i][~mask].mean() < 0.25, (m[i][mask].mean(),
                                                                            m[i][~mask].mean())


def test_degenerate_inputs_give_ones(feats):
    f = np.array(feats[:1].repeat(6, axis=0))
    f[1] = 0.7  # constant image features
    f[2] = 0.0
    f[3, 2, 3, 5] = np.nan
    f[4, 0, 0, 0] = np.inf
    f[5] = f[5, :1, :1]  # all tokens equal to one real token
    m = np.asarray(_psm(f, (6, 7), PSMOptions()))
    assert np.all(np.isfinite(m))
    np.testing.assert_array_equal(m[1:], 1.0)
    # a degenerate neighbour in the batch does not change a normal image's map
    np.testing.assert_allclose(m[0], np.asarray(_psm(feats, (6, 7), PSMOptions()))[0], atol=1e-6)
    assert float(m[0].min()) == 0.0
    stats = rl.map_stats(jnp.asarray(m))
    assert abs(float(stats["map_fallback_frac"]) - 5 / 6) < 1e-6


def test_uniform_normalize_and_options(feats):
    ones = rl.psm_map(feats, (8, 8), {"aggregation": "uniform"})
    np.testing.assert_array_equal(np.asarray(ones), 1.0)
    m = _psm(feats, (8, 8), PSMOptions(normalize_mean=True))
    np.testing.assert_allclose(np.asarray(m).mean(axis=(1, 2)), 1.0, rtol=1e-5)

    class Cfg:  # any attribute object (e.g. an ml_collections ConfigDict)
        num_components = 2
        sign_rule = "sklearn_u"
        enabled = True

    opt = PSMOptions.from_any(Cfg(), smooth_sigma=0.5)
    assert (opt.num_components, opt.sign_rule, opt.smooth_sigma) == (2, "sklearn_u", 0.5)
    with pytest.raises(ConfigError):
        PSMOptions(sign_rule="centre")
    with pytest.raises(ConfigError):
        PSMOptions(aggregation="max")
    with pytest.raises(ConfigError):
        rl.psm_map(feats, (8, 8), num_components=99)


def test_psm_has_no_gradient(feats):
    g = jax.jit(jax.grad(lambda f: jnp.sum(rl.psm_map(f, (6, 7)) ** 2)))(jnp.asarray(feats))
    assert float(jnp.max(jnp.abs(g))) == 0.0


# ----------------------------------------------------------------------------- video
def ref_video(frame_feats, latent_thw, time_resample, resize=ref_resize):
    t_lat, hh, ww = latent_thw
    maps = np.stack([ref_map(f, (hh, ww), resize=resize) for f in frame_feats])  # (T, H, W)
    maps = time_resample(maps, t_lat)
    maps = ndi.gaussian_filter1d(maps, sigma=0.3, axis=0)  # per pixel time series, as official
    return (maps - maps.min()) / (maps.max() - maps.min() + 1e-8)


def np_time_linear(maps, t_lat):
    """align_corners=False linear resampling: src = (i+0.5)*T/T_lat - 0.5, clamped to [0, T-1]."""
    t = maps.shape[0]
    src = np.clip((np.arange(t_lat) + 0.5) * t / t_lat - 0.5, 0, t - 1)
    flat = maps.reshape(t, -1)
    return np.stack([np.interp(src, np.arange(t), flat[:, p]) for p in range(flat.shape[1])], 1).reshape(
        (t_lat,) + maps.shape[1:])


def torch_time_trilinear(maps, t_lat):
    import torch

    x = torch.from_numpy(maps)[None, None]
    return torch.nn.functional.interpolate(x, size=(t_lat,) + maps.shape[1:], mode="trilinear",
                                           align_corners=False)[0, 0].numpy()


@pytest.fixture(scope="module")
def video_feats():
    f = structured_features(np.random.default_rng(5), 9, 5, 6)
    # a smooth temporal drift so the time axis carries structure
    return (f + np.linspace(0, 1, 9)[:, None, None, None] * f[0]).astype(np.float32)[None]


def test_psm_video_matches_numpy(video_feats):
    ours = _psm_video(video_feats, (3, 5, 6), PSMOptions())
    ref = ref_video(video_feats[0], (3, 5, 6), np_time_linear, resize=lambda m, s: m)
    assert_close(ours[0], ref, rel=1e-5, what="video psm (numpy)")
    assert ours.shape == (1, 3, 5, 6)


@pytest.mark.parametrize("frames,latent_frames", [(53, 14), (9, 9), (5, 9)])
def test_psm_video_time_resampling_and_sigma(frames, latent_frames):
    """Wan's recipe (53 frames -> 14 latent frames), no resampling (only the sigma=0.3 smoothing)
    and upsampling in time, against linear interpolation + scipy's gaussian_filter1d(sigma=0.3)."""
    rng = np.random.default_rng(frames)
    f = structured_features(rng, frames, 4, 5)
    f = (f + np.sin(np.linspace(0, 3, frames))[:, None, None, None] * f[0]).astype(np.float32)[None]
    ours = _psm_video(f, (latent_frames, 4, 5), PSMOptions())
    ref = ref_video(f[0], (latent_frames, 4, 5), np_time_linear, resize=lambda m, s: m)
    assert_close(ours[0], ref, rel=1e-5, what=f"video psm {frames}->{latent_frames} frames")
    if frames == latent_frames:  # the smoothing alone changes the volume (sigma=0.3 is not a no-op)
        per_frame = np.stack([ref_map(x, (4, 5), resize=lambda m, s: m) for x in f[0]])
        per_frame = (per_frame - per_frame.min()) / (per_frame.max() - per_frame.min())
        assert np.abs(np.asarray(ours[0]) - per_frame).max() > 1e-3


@pytest.mark.torch
def test_psm_video_matches_official_torch(torch, video_feats):
    ours = _psm_video(video_feats, (3, 8, 10), PSMOptions())
    ref = ref_video(video_feats[0], (3, 8, 10), torch_time_trilinear)
    assert_close(ours[0], ref, rel=1e-5, what="video psm (torch trilinear)")


def test_psm_video_degenerate_frame_and_uniform(video_feats):
    f = np.array(video_feats)
    f[0, 4] = 1.0  # one constant frame -> that frame's map is all ones, the volume stays finite
    m = np.asarray(_psm_video(f, (3, 5, 6), PSMOptions()))
    assert np.all(np.isfinite(m)) and m.min() == 0.0 and abs(m.max() - 1.0) < 1e-6
    f[0] = 0.0
    np.testing.assert_array_equal(np.asarray(_psm_video(f, (3, 5, 6), PSMOptions())), 1.0)
    np.testing.assert_array_equal(np.asarray(rl.psm_map_video(f, (3, 5, 6), aggregation="uniform")), 1.0)


def test_controls_exactly():
    """psm.control: the map, 1 - M, the batch-mean map for every sample, the next group's map."""
    from vipo_jax.rl import control_map

    maps = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (6, 4, 5)))
    np.testing.assert_array_equal(np.asarray(control_map(maps, "none", 2)), maps)
    np.testing.assert_array_equal(np.asarray(control_map(maps, "inverted", 2)), 1.0 - maps)
    np.testing.assert_allclose(np.asarray(control_map(maps, "mean_map", 2)),
                               np.broadcast_to(maps.mean(0, keepdims=True), maps.shape), rtol=1e-6)
    shuffled = np.asarray(control_map(maps, "shuffled", 2))
    np.testing.assert_array_equal(shuffled, maps[[2, 3, 4, 5, 0, 1]])  # sample i gets sample (i + G) mod B
    with pytest.raises(ConfigError, match="two prompts"):
        control_map(maps[:2], "shuffled", 2)
    with pytest.raises(ConfigError, match="control"):
        rl.PSMOptions(control="random")
