"""Run outputs: metrics as JSON lines and TensorBoard, image grids, and the reward-curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
        self._f.write(json.dumps({"step": step, **clean}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if np.isfinite(v):
                    self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read metrics.jsonl; on resume, a later record of the same step replaces the earlier one."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


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
