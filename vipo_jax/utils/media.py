"""Pictures of a run: image grids, animated GIFs of video grids, PNG files and metric curves.
Used by the train loop, evaluation, the PSM map tool and the toy pretraining scripts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def image_grid(images01: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile (n, h, w, 3) float images in [0, 1] into one uint8 (H, W, 3) grid with mid-grey gutters
    (``cols`` defaults to a square-ish layout; ``scale`` repeats pixels)."""
    images01 = np.asarray(images01, dtype=np.float32)
    n, h, w, _ = images01.shape
    cols = max(1, min(cols or int(math.ceil(math.sqrt(n))), n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, dtype=np.uint8)
    tiles = (np.clip(images01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = tiles[k]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(path: str | os.PathLike, array_uint8: np.ndarray, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(array_uint8)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def plot_curves(records: list[dict], keys: list[str], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        steps = [r["step"] for r in records if r.get(k) is not None]
        vals = np.array([r[k] for r in records if r.get(k) is not None])
        ax.plot(steps, vals, alpha=0.35, label=k)
        if len(vals) >= 5:
            win = max(2, len(vals) // 10)
            smooth = np.convolve(vals, np.ones(win) / win, mode="valid")
            ax.plot(steps[win - 1:], smooth, label=f"{k} (mean of {win})")
        ax.set_xlabel("iteration")
        ax.set_title(k)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def video_grid(videos01: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile (n, T, h, w, 3) float videos in [0, 1] into uint8 (T, H, W, 3) grid frames (one
    :func:`image_grid` per time step)."""
    videos01 = np.asarray(videos01, dtype=np.float32)
    if videos01.ndim != 5:
        raise ValueError(f"videos must be (n, T, h, w, 3), got {videos01.shape}")
    return np.stack([image_grid(videos01[:, t], cols=cols, pad=pad, scale=scale) for t in range(videos01.shape[1])])


def save_gif(path: str | os.PathLike, frames_uint8: np.ndarray, fps: float = 8.0, scale: int = 1) -> None:
    """An animated, endlessly looping GIF of (T, H, W, 3) uint8 frames (Pillow; nearest-neighbour
    upscaling by ``scale``). GIF stores frame times in 1/100 s, so ``fps`` is rounded to that."""
    from PIL import Image

    frames = np.asarray(frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    imgs = [Image.fromarray(f) for f in frames]
    if scale > 1:
        imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=max(10, int(round(1000.0 / fps))),
                 loop=0, optimize=False, disposal=1)


def save_samples(path_stem: str | os.PathLike, samples01: np.ndarray, cols: int | None = None, scale: int = 1,
                 fps: float = 8.0) -> Path:
    """A grid of evaluation samples: ``<stem>.png`` for images (n, h, w, 3), an animated
    ``<stem>.gif`` for videos (n, T, h, w, 3). Returns the written path."""
    samples01 = np.asarray(samples01)
    stem = Path(path_stem)
    if samples01.ndim == 5:
        path = stem.with_name(stem.name + ".gif")
        save_gif(path, video_grid(samples01, cols=cols), fps=fps, scale=scale)
    else:
        path = stem.with_name(stem.name + ".png")
        save_png(path, image_grid(samples01, cols=cols), scale=scale)
    return path


def heat_overlay(samples01: np.ndarray, maps01: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """PSM maps drawn over their samples: ``samples01`` (n, H, W, 3) or videos (n, T, H, W, 3) in
    [0, 1], ``maps01`` (n, h, w) or (n, t, h, w) in [0, 1] (a latent grid, upsampled here by
    nearest neighbour, frames by nearest time); the map's heat colours (low: dark blue, high:
    yellow) blended over the sample with weight ``alpha``. Same shape as ``samples01``."""
    import matplotlib

    samples01 = np.asarray(samples01, np.float32)
    maps01 = np.clip(np.asarray(maps01, np.float32), 0.0, 1.0)
    video = samples01.ndim == 5
    if video:
        t, m_t = samples01.shape[1], maps01.shape[1]
        maps01 = maps01[:, np.minimum((np.arange(t) * m_t) // t, m_t - 1)]
    h, w = samples01.shape[-3:-1]
    mh, mw = maps01.shape[-2:]
    rows = np.minimum((np.arange(h) * mh) // h, mh - 1)
    cols = np.minimum((np.arange(w) * mw) // w, mw - 1)
    up = maps01[..., rows, :][..., cols]
    heat = matplotlib.colormaps["viridis"](up)[..., :3].astype(np.float32)
    return (1.0 - alpha) * samples01 + alpha * heat
