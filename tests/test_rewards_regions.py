"""Rewards that live in a region: against numpy on images with known masks, and the subject-mask
rule against the true masks of rendered toy digits."""

from __future__ import annotations

import numpy as np
import pytest

from vipo_jax.rewards import regions
from vipo_jax.toy import digits


def _np_redness(x):
    return x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])


def _boxes(seed: int, n: int = 6, size: int = 32):
    """Images of a random background colour with a random-coloured box (colours at least 0.5 apart)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        while True:
            bg, fg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            if np.linalg.norm(fg - bg) > 0.5:
                break
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        y0, x0 = rng.integers(4, 12, 2)
        y1, x1 = y0 + rng.integers(6, 14), x0 + rng.integers(6, 14)
        m = np.zeros((size, size), bool)
        m[y0:y1, x0:x1] = True
        img[m] = fg
        images.append(img.astype(np.float32))
        masks.append(m)
    return np.stack(images), np.stack(masks)


def test_region_rewards_against_numpy():
    images, masks = _boxes(0)
    np.testing.assert_array_equal(np.asarray(regions.subject_mask(images)), masks.astype(np.float32))
    red = _np_redness(images.astype(np.float64))
    want_s = np.array([r[m].mean() for r, m in zip(red, masks)])
    want_b = np.array([r[~m].mean() for r, m in zip(red, masks)])
    np.testing.assert_allclose(np.asarray(regions.subject_redness(images)), want_s, atol=1e-6)
    np.testing.assert_allclose(np.asarray(regions.background_redness(images)), want_b, atol=1e-6)
    np.testing.assert_allclose(np.asarray(regions.subject_fraction(images)), masks.mean((1, 2)), atol=1e-7)


def test_uniform_image_has_no_subject():
    flat = np.broadcast_to(np.float32([1.0, 0.0, 0.0]), (2, 16, 16, 3))  # a red square: a digit painted over
    assert np.asarray(regions.subject_redness(flat)).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(np.asarray(regions.background_redness(flat)), [1.0, 1.0])
    assert np.asarray(regions.subject_fraction(flat)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_subject_mask_finds_rendered_digits(split):
    """Every (digit, fg, bg) prompt combination rendered with jitter: the mask from the image alone
    against the true stroke mask (the renderer's alpha matte > 0.5)."""
    images8, targets = digits.load_split("train")
    combos = digits.prompt_combos(split)
    rng = np.random.default_rng(1)
    ious = []
    for k, (d, f, b) in enumerate(combos[::3]):
        j = int(np.nonzero(targets == d)[0][k % 10])
        seed = int(rng.integers(1 << 30))
        img = digits.render(images8[j], f, b, rng=np.random.default_rng(seed))
        alpha = digits.render(images8[j], "white", "black", rng=np.random.default_rng(seed))[..., 0]
        true = alpha > 0.5
        got = np.asarray(regions.subject_mask(img[None]))[0] > 0.5
        ious.append((got & true).sum() / (got | true).sum())
    ious = np.asarray(ious)
    assert ious.mean() > 0.9 and ious.min() > 0.75, (ious.mean(), ious.min())
