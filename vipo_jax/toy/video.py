"""The moving-digits toy world (video): the colored digits of :mod:`vipo_jax.toy.digits`, sliding.

A clip is ``FRAMES`` (9 = 1 + 4k, what the Wan VAE takes) frames of ``FRAME_SIZE`` x ``FRAME_SIZE``
(32 x 32) in which one digit, rendered as in the image world, translates from left to right by
``TRAVEL`` pixels at constant speed over a flat background. The motion is fixed (not prompted), so
the captions are the image world's ("a red 3 on a blue background") and its prompt splits,
tokenizers, toy CLIP and digit classifier carry over unchanged. The sizes are a compromise: the
digit is read per frame by the image world's classifier after upsampling to 64 x 64, which was
trained on nearly centred digits, so the digit box (28 px) and the travel (4 px, half a latent
position each way) are what keeps it readable (about 0.87 accuracy on the ground-truth clips,
against 0.93 for the unmoved images).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from vipo_jax.errors import ConfigError
from vipo_jax.toy.digits import (
    DIGITS,
    PALETTE_RGB,
    SPLITS,
    caption,
    color_index,
    load_split,
    prompt_combos,
    render,
)

FRAMES = 9
FRAME_SIZE = 32
#: Side of the box the digit is rendered in (then placed centred in the frame).
DIGIT_BOX = 28
#: Horizontal travel of the digit over the clip, in pixels (from -TRAVEL/2 to +TRAVEL/2).
TRAVEL = 4.0
#: Frames are upsampled to this size for the image world's classifier, CLIP and DINOv2.
READOUT_SIZE = 64


class ClipsSample(NamedTuple):
    """What :func:`sample_clips` returns; unpacks as ``videos, captions, labels``."""

    videos: np.ndarray  # (n, FRAMES, size, size, 3) float32 in [0, 1]
    captions: list[str]
    labels: np.ndarray  # (n, 3) int32: digit, fg palette index, bg palette index


def offsets(frames: int = FRAMES, travel: float = TRAVEL) -> np.ndarray:
    """Horizontal displacement (pixels) of the digit in each frame: linear, left to right."""
    return np.linspace(-travel / 2.0, travel / 2.0, frames).astype(np.float32)


def render_clip(digit_img: np.ndarray, fg: int | str, bg: int | str, *, frames: int = FRAMES,
                size: int = FRAME_SIZE, box: int = DIGIT_BOX, travel: float = TRAVEL,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """One clip (frames, size, size, 3) float32 in [0, 1]: the digit's alpha matte (``render`` with
    its jitter when ``rng`` is given) placed centred, shifted sub-pixel (linear) in each frame, and
    composited ``fg`` over ``bg``."""
    if (frames - 1) % 4:
        raise ConfigError(f"a Wan clip has 1 + 4k frames, got {frames}")
    if box > size:
        raise ConfigError(f"digit box {box} larger than the frame {size}")
    alpha = render(digit_img, "white", "black", size=box, rng=rng)[..., 0]
    canvas = np.zeros((size, size), np.float32)
    o = (size - box) // 2
    canvas[o:o + box, o:o + box] = alpha
    fg_rgb, bg_rgb = PALETTE_RGB[color_index(fg)], PALETTE_RGB[color_index(bg)]
    out = np.empty((frames, size, size, 3), np.float32)
    for t, dx in enumerate(offsets(frames, travel)):
        a = np.clip(ndimage.shift(canvas, (0.0, float(dx)), order=1, mode="constant"), 0, 1)[..., None]
        out[t] = a * fg_rgb + (1 - a) * bg_rgb
    return out


def sample_clips(n: int, seed: int = 0, split: str = "train", prompt_split: str | None = "same",
                 frames: int = FRAMES, size: int = FRAME_SIZE) -> ClipsSample:
    """``n`` random moving-digit clips with captions and (digit, fg, bg) labels; digits from the
    sklearn ``split`` and colours from the prompt combinations of ``prompt_split`` ("same": the
    same split), exactly as :func:`vipo_jax.toy.digits.sample_dataset` draws them. Deterministic."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    images8, targets = load_split(split)
    combos = prompt_combos(split if prompt_split == "same" else prompt_split)
    by_digit: dict[int, list[tuple[int, int]]] = {d: [] for d in DIGITS}
    for d, f, b in combos:
        by_digit[d].append((f, b))
    rng = np.random.default_rng([int(seed), SPLITS.index(split), 7])
    videos = np.empty((n, frames, size, size, 3), np.float32)
    labels = np.empty((n, 3), np.int32)
    captions = []
    for k in range(n):
        j = int(rng.integers(len(images8)))
        d = int(targets[j])
        f, b = by_digit[d][int(rng.integers(len(by_digit[d])))]
        videos[k] = render_clip(images8[j], f, b, frames=frames, size=size, rng=rng)
        labels[k] = (d, f, b)
        captions.append(caption(d, f, b))
    return ClipsSample(videos, captions, labels)
