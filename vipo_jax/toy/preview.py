"""Save a PNG grid of toy-world samples so a human can look at the data.

    python -m vipo_jax.toy.preview /tmp/digits.png --n 48 --split train
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vipo_jax.toy.digits import sample_dataset
from vipo_jax.utils.media import image_grid


def save_preview(path: str | Path, n: int = 48, seed: int = 0, split: str = "train", cols: int = 8,
                 scale: int = 1, captions_path: str | Path | None = None) -> Path:
    """Sample `n` images with `sample_dataset`, save them as a PNG grid at `path`, and the captions
    (row-major, one per line) next to it (`<path>.txt`, or `captions_path`). Returns the PNG path."""
    from PIL import Image


    images, captions, _ = sample_dataset(n, seed=seed, split=split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, cols=cols, scale=scale)).save(path)
    cap = Path(captions_path) if captions_path is not None else path.with_suffix(path.suffix + ".txt")
    cap.write_text("\n".join(captions) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--scale", type=int, default=1)
    a = p.parse_args(argv)
    print(save_preview(a.path, n=a.n, seed=a.seed, split=a.split, cols=a.cols, scale=a.scale))


if __name__ == "__main__":
    main()
