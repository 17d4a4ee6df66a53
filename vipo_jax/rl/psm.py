"""Perceptual Structuring Module (docs/METHOD.md §3): a training-free allocation map from backbone features.

Input: the patch features ``F`` (B, h, w, D) of the final decoded sample (DINOv2's last layer-normed
patch tokens; the backbone is run by the caller). Per image: PCA over its own ``h*w`` tokens
(``jnp.linalg.svd``), an explicit sign rule, reverse min-max of the component scores aggregated by
explained variance, Gaussian smoothing on the patch grid, min-max, antialiased bilinear resize to the
latent grid, min-max. The map is in [0, 1] and is not renormalised (``normalize_mean`` is an
extension). Everything runs under ``stop_gradient``.

The fixed linear operators (Gaussian filter with scipy ``mode='reflect'`` boundaries, torch's
antialiased bilinear resize, torch's linear temporal resize) are built once on the host in float64
as small dense matrices from the static sizes and applied as ``einsum``s at HIGHEST precision; this
reproduces the scipy/torch semantics exactly, including sizes smaller than the filter radius.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vipo_jax.errors import ConfigError

SIGN_RULES = ("border", "sklearn_u", "sklearn_v")
AGGREGATIONS = ("weighted", "average", "first_pc", "uniform")
#: Controls that can falsify the map (``control_map``): the map itself, its inverse, the batch-mean
#: map (the same spatial prior for every sample), another group's map (right statistics, wrong image).
CONTROLS = ("none", "inverted", "mean_map", "shuffled")
_HIGHEST = jax.lax.Precision.HIGHEST
_MINMAX_EPS = 1e-8      # added to max-min, as in the official code
_DEGENERATE_RANGE = 1e-6  # a smoothed map flatter than this carries no structure -> all ones
_DEGENERATE_VAR = 1e-10   # centred energy / raw energy below this: constant image features


@dataclasses.dataclass(frozen=True)
class PSMOptions:
    """PSM switches. ``smooth_sigma`` is in patch units (0 disables the filter; the min-max after
    it still runs). ``temporal_sigma`` is the video time-axis smoothing (frames of the latent)."""

    num_components: int = 3
    sign_rule: str = "border"
    aggregation: str = "weighted"
    smooth_sigma: float = 1.0
    normalize_mean: bool = False
    temporal_sigma: float = 0.3
    control: str = "none"

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ConfigError(f"psm control must be one of {CONTROLS}, got {self.control!r}")
        if self.sign_rule not in SIGN_RULES:
            raise ConfigError(f"psm sign_rule must be one of {SIGN_RULES}, got {self.sign_rule!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"psm aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if int(self.num_components) < 1:
            raise ConfigError(f"psm num_components must be >= 1, got {self.num_components}")
        if float(self.smooth_sigma) < 0 or float(self.temporal_sigma) < 0:
            raise ConfigError("psm smoothing sigmas must be >= 0")

    @classmethod
    def from_any(cls, options: Any = None, **overrides: Any) -> PSMOptions:
        """Build from a ``PSMOptions``, a mapping, or any attribute object (e.g. an
        ``ml_collections.ConfigDict``); unknown keys are ignored, ``overrides`` win."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if isinstance(options, Mapping):
                if f.name in options:
                    values[f.name] = options[f.name]
            elif options is not None and hasattr(options, f.name):
                values[f.name] = getattr(options, f.name)
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------- static operators
def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """scipy.ndimage mode 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a)."""
    j = np.mod(i, 2 * n)
    return np.where(j >= n, 2 * n - 1 - j, j)


@functools.lru_cache(maxsize=256)
def gaussian_filter_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) float64 matrix of ``scipy.ndimage.gaussian_filter1d(x, sigma, mode='reflect',
    truncate=truncate)``: kernel radius ``int(truncate*sigma + 0.5)``, normalised weights."""
    out = np.zeros((n, n), np.float64)
    if sigma <= 1e-15:  # scipy skips the axis
        np.fill_diagonal(out, 1.0)
        return out
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x * x)
    phi /= phi.sum()
    rows = np.arange(n)
    for k, w in zip(range(-radius, radius + 1), phi):
        np.add.at(out, (rows, _reflect_index(rows + k, n)), w)
    return out


@functools.lru_cache(maxsize=256)
def antialias_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of torch ``F.interpolate(mode='bilinear', align_corners=False,
    antialias=True)`` along one axis (``_compute_indices_min_size_weights_aa``): triangle filter
    stretched by the scale when downsampling, window-normalised weights."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # (interp_size/2) * scale, interp_size = 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    out = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C++ truncation toward zero
        xsize = min(int(center + support + 0.5), in_size) - xmin
        j = np.arange(xsize, dtype=np.float64)
        w = np.maximum(0.0, 1.0 - np.abs((j + xmin - center + 0.5) * invscale))
        total = w.sum()
        if total != 0.0:
            w = w / total
        out[i, xmin:xmin + xsize] = w
    return out


@functools.lru_cache(maxsize=256)
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of torch linear interpolation with ``align_corners=False`` and an
    explicit output size: ``src = (i+0.5)*in/out - 0.5`` clamped at 0, neighbours ``floor(src)`` and
    ``min(floor(src)+1, in-1)``. (The official Wan code uses ``trilinear`` with unchanged H, W, which
    is exactly this along time.)"""
    scale = in_size / out_size
    out = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        l1 = src - i0
        out[i, i0] += 1.0 - l1
        out[i, i1] += l1
    return out


def _apply_2d(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """``mh @ x @ mw.T`` over the last two axes of ``x`` (..., h, w)."""
    return jnp.einsum("ij,...jk,lk->...il", jnp.asarray(mh, jnp.float32), x,
                      jnp.asarray(mw, jnp.float32), precision=_HIGHEST)


def gaussian_smooth_2d(x: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
    """scipy ``gaussian_filter(x, sigma)`` over the last two axes (reflect boundaries)."""
    h, w = x.shape[-2:]
    return _apply_2d(x, gaussian_filter_matrix(h, float(sigma), truncate),
                     gaussian_filter_matrix(w, float(sigma), truncate))


def resize_bilinear_antialias(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(x, size, mode='bilinear', align_corners=False, antialias=True)`` over the
    last two axes of ``x`` (..., h, w)."""
    h, w = x.shape[-2:]
    return _apply_2d(x, antialias_resize_matrix(h, int(size[0])), antialias_resize_matrix(w, int(size[1])))


# --------------------------------------------------------------------------- the map
def _minmax(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    mn = jnp.min(x, axis=axes, keepdims=True)
    mx = jnp.max(x, axis=axes, keepdims=True)
    return (x - mn) / (mx - mn + _MINMAX_EPS), mx - mn


def _reverse_minmax(z: jax.Array) -> jax.Array:
    """``(max z - z)/(max z - min z)`` over tokens (last axis); a constant component gives 0.5."""
    mx = jnp.max(z, axis=-1, keepdims=True)
    mn = jnp.min(z, axis=-1, keepdims=True)
    rng = mx - mn
    return jnp.where(rng > 0, (mx - z) / jnp.where(rng > 0, rng, 1.0), 0.5)


def _sign(a: jax.Array) -> jax.Array:
    return jnp.where(a < 0, -1.0, 1.0).astype(jnp.float32)


def _border_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m.reshape(-1)


def _patch_map(feats: jax.Array, h: int, w: int, opt: PSMOptions) -> tuple[jax.Array, jax.Array]:
    """One image: (N, D) tokens -> (the aggregated reverse-mapped (N,) map, degenerate flag)."""
    k = int(opt.num_components)
    finite = jnp.all(jnp.isfinite(feats))
    f = jnp.where(finite, feats, 0.0)
    xc = f - jnp.mean(f, axis=0, keepdims=True)
    total = jnp.sum(xc * xc)
    degenerate = jnp.logical_or(~finite, total <= _DEGENERATE_VAR * jnp.sum(f * f))
    u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    lam = (s * s) / jnp.where(total > 0, total, 1.0)  # ratio of the TOTAL variance
    z = (u * s).T  # (K, N) scores, as PCA.fit_transform
    if opt.sign_rule == "sklearn_v":  # sklearn >= 1.5: largest-|loading| feature positive
        idx = jnp.argmax(jnp.abs(vt), axis=1)
        sign = _sign(jnp.take_along_axis(vt, idx[:, None], axis=1)[:, 0])
    elif opt.sign_rule == "sklearn_u":  # sklearn <= 1.4: largest-|score| token positive
        idx = jnp.argmax(jnp.abs(u), axis=0)
        sign = _sign(jnp.take_along_axis(u, idx[None, :], axis=0)[0])
    else:  # border: background (grid border) positive -> reverse mapping favours the subject
        border = jnp.asarray(_border_mask(h, w))
        sign = _sign(jnp.sum(jnp.where(border[None, :], z, 0.0), axis=1))  # sign of the border mean
    z = z * sign[:, None]
    if opt.aggregation == "weighted":
        agg = jnp.sum(lam[:, None] * _reverse_minmax(z), axis=0)
    elif opt.aggregation == "average":
        agg = _reverse_minmax(jnp.mean(z, axis=0))
    else:  # first_pc
        agg = _reverse_minmax(z[0])
    return jnp.clip(agg, 0.0, 1.0), degenerate


def _finish(m: jax.Array, degenerate: jax.Array, axes: tuple[int, ...], normalize_mean: bool) -> jax.Array:
    bad = jnp.logical_or(degenerate, ~jnp.all(jnp.isfinite(m), axis=axes))
    bad = bad.reshape(bad.shape + (1,) * len(axes))
    m = jnp.where(bad, 1.0, m)
    if normalize_mean:
        m = m / jnp.mean(m, axis=axes, keepdims=True)
    return m


def _psm_map_raw(features: jax.Array, latent_hw: tuple[int, int], opt: PSMOptions) -> jax.Array:
    feats = jnp.asarray(features, jnp.float32)
    if feats.ndim != 4:
        raise ConfigError(f"psm features must be (B, h, w, D), got shape {feats.shape}")
    b, h, w, d = feats.shape
    big_h, big_w = int(latent_hw[0]), int(latent_hw[1])
    if opt.aggregation == "uniform":
        return jnp.ones((b, big_h, big_w), jnp.float32)
    if int(opt.num_components) > min(h * w, d):
        raise ConfigError(f"psm num_components={opt.num_components} exceeds min(tokens={h * w}, dim={d})")
    agg, degenerate = jax.vmap(lambda f: _patch_map(f, h, w, opt))(feats.reshape(b, h * w, d))
    m = gaussian_smooth_2d(agg.reshape(b, h, w), float(opt.smooth_sigma))
    m, rng = _minmax(m, (1, 2))
    degenerate = jnp.logical_or(degenerate, ~(rng[:, 0, 0] > _DEGENERATE_RANGE))
    m = resize_bilinear_antialias(m, (big_h, big_w))
    m, _ = _minmax(m, (1, 2))
    return _finish(m, degenerate, (1, 2), normalize_mean=False)


def psm_map(features: jax.Array, latent_hw: tuple[int, int], options: Any = None,
            **overrides: Any) -> jax.Array:
    """Allocation maps ``(B, H_lat, W_lat)`` in [0, 1] from patch features ``(B, h, w, D)``.

    ``options``: :class:`PSMOptions`, a mapping or a config object (see
    :meth:`PSMOptions.from_any`); keyword ``overrides`` win. A degenerate image (constant or
    non-finite features, or a structureless map) gives an all-ones map (plain GRPO), never NaN."""
    opt = PSMOptions.from_any(options, **overrides)
    m = _psm_map_raw(jax.lax.stop_gradient(features), latent_hw, opt)
    if opt.normalize_mean:
        m = m / jnp.mean(m, axis=(1, 2), keepdims=True)
    return jax.lax.stop_gradient(m)


def psm_map_video(frame_features: jax.Array, latent_thw: tuple[int, int, int], options: Any = None,
                  **overrides: Any) -> jax.Array:
    """Spatio-temporal maps ``(B, T_lat, H_lat, W_lat)`` from per-frame features ``(B, T, h, w, D)``.

    Per-frame spatial maps (:func:`psm_map`), stacked in time, resampled to ``T_lat`` frames with
    torch's linear interpolation (``align_corners=False``, see :func:`linear_resize_matrix`), a 1-D
    Gaussian along time with ``temporal_sigma`` (scipy reflect semantics), then one min-max over the
    whole (T, H, W) volume. No spatio-temporal PCA (as the official code)."""
    opt = PSMOptions.from_any(options, **overrides)
    feats = jax.lax.stop_gradient(jnp.asarray(frame_features, jnp.float32))
    if feats.ndim != 5:
        raise ConfigError(f"psm video features must be (B, T, h, w, D), got shape {feats.shape}")
    b, t = feats.shape[:2]
    t_lat, big_h, big_w = (int(v) for v in latent_thw)
    if opt.aggregation == "uniform":
        return jnp.ones((b, t_lat, big_h, big_w), jnp.float32)
    frames = _psm_map_raw(feats.reshape((b * t,) + feats.shape[2:]), (big_h, big_w), opt)
    frames = frames.reshape(b, t, big_h, big_w)
    op = gaussian_filter_matrix(t_lat, float(opt.temporal_sigma)) @ linear_resize_matrix(t, t_lat)
    m = jnp.einsum("ts,bshw->bthw", jnp.asarray(op, jnp.float32), frames, precision=_HIGHEST)
    m, rng = _minmax(m, (1, 2, 3))
    degenerate = ~(rng[:, 0, 0, 0] > _DEGENERATE_RANGE)
    m = _finish(m, degenerate, (1, 2, 3), normalize_mean=opt.normalize_mean)
    return jax.lax.stop_gradient(m)


def control_map(maps: jax.Array, control: str, group_size: int) -> jax.Array:
    """A control of the advantage map (``psm.control``), same shape as ``maps`` (B, *positions):

    * ``none``: the map;
    * ``inverted``: ``1 - M`` (credit where the PSM says it should not go);
    * ``mean_map``: the batch-mean map for every sample (a fixed spatial prior, no per-image content);
    * ``shuffled``: sample i gets the map of sample ``(i + G) mod B``, the same position in the next
      group (another prompt's image: real map statistics, the wrong content). Needs two or more
      prompts per iteration.
    """
    m = jnp.asarray(maps, jnp.float32)
    if control == "none":
        return m
    if control == "inverted":
        return 1.0 - m
    if control == "mean_map":
        return jnp.broadcast_to(jnp.mean(m, axis=0, keepdims=True), m.shape)
    if control == "shuffled":
        if m.shape[0] <= int(group_size):
            raise ConfigError("psm control 'shuffled' needs at least two prompts per iteration (another group's map)")
        return jnp.roll(m, -int(group_size), axis=0)
    raise ConfigError(f"psm control must be one of {CONTROLS}, got {control!r}")


def map_stats(m: jax.Array) -> dict[str, jax.Array]:
    """Summary numbers worth logging: mean (the effective step-size scale), min, max, and the
    fraction of all-ones (fallback) maps."""
    axes = tuple(range(1, m.ndim))
    ones = jnp.all(m == 1.0, axis=axes)
    return {"map_mean": jnp.mean(m), "map_min": jnp.min(m), "map_max": jnp.max(m),
            "map_fallback_frac": jnp.mean(ones.astype(jnp.float32))}


__all__ = [
    "AGGREGATIONS", "CONTROLS", "SIGN_RULES", "PSMOptions", "antialias_resize_matrix", "control_map",
    "gaussian_filter_matrix",
    "gaussian_smooth_2d", "linear_resize_matrix", "map_stats", "psm_map", "psm_map_video",
    "resize_bilinear_antialias",
]
