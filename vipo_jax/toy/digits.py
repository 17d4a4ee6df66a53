"""The colored-digits toy world: scikit-learn's bundled 8x8 digits, upsampled, jittered and colored.

An image is a digit stroke in a foreground color composited over a flat background color, with
captions like "a red 3 on a blue background". Everything is generated on the fly from
`sklearn.datasets.load_digits` (1797 samples that ship inside the scikit-learn wheel), so nothing
is downloaded.

Splits are fixed: the first 80% of the sklearn samples are "train", the last 20% "eval" (so the
eval digits are drawn by writers/scans the train split never shows), and the prompts (every
(digit, fg, bg) combination with fg != bg) are partitioned so that some combinations are held out
for out-of-domain evaluation while every digit, color and (fg, bg) pair still appears in train.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from vipo_jax.errors import ConfigError, DataError

#: Every color of the world, name -> RGB in [0, 1]. Indices into this tuple are the color labels.
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (1.0, 0.0, 0.0)),
    ("green", (0.0, 1.0, 0.0)),
    ("blue", (0.0, 0.0, 1.0)),
    ("yellow", (1.0, 1.0, 0.0)),
    ("cyan", (0.0, 1.0, 1.0)),
    ("magenta", (1.0, 0.0, 1.0)),
    ("white", (1.0, 1.0, 1.0)),
    ("gray", (0.5, 0.5, 0.5)),
    ("black", (0.0, 0.0, 0.0)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
#: (len(PALETTE), 3) float32 array of the palette colors.
PALETTE_RGB: np.ndarray = np.asarray([rgb for _, rgb in PALETTE], dtype=np.float32)
#: Palette indices allowed as digit (foreground) colors: the bright, saturated ones.
FG_COLORS: tuple[int, ...] = tuple(COLOR_NAMES.index(n) for n in
                                   ("red", "green", "blue", "yellow", "cyan", "magenta", "white"))
#: Palette indices allowed as background colors (red included, so redness can be gained there too).
BG_COLORS: tuple[int, ...] = tuple(COLOR_NAMES.index(n) for n in
                                   ("black", "gray", "white", "blue", "green", "red"))
DIGITS: tuple[int, ...] = tuple(range(10))
SPLITS = ("train", "eval")
#: Fraction of the sklearn samples (the last ones) held out as the "eval" split.
EVAL_FRACTION = 0.2
IMAGE_SIZE = 64

# Rendering constants: an 8x8 sklearn cell spans this many output pixels (at size 64), so the
# digit box is about 52 px with a ~6 px margin; jitter scales/shifts/rotates it a little.
_CELL_PX = 6.5 / 64.0
_JITTER_SCALE = (0.88, 1.08)
_JITTER_SHIFT = 4.0 / 64.0      # max shift, as a fraction of the image size
_JITTER_ROT_DEG = 10.0
_THRESHOLD = 0.42               # soft threshold on the upsampled [0, 1] intensity...
_SOFTNESS = 0.05                # ...with this logistic width (edges ~1.5 px wide: anti-aliased)


class DigitsSample(NamedTuple):
    """What `sample_dataset` returns; unpacks as `images, captions, labels`."""

    images: np.ndarray      # (n, size, size, 3) float32 in [0, 1]
    captions: list[str]     # n captions
    labels: np.ndarray      # (n, 3) int32: digit, fg palette index, bg palette index


def color_index(color: int | str) -> int:
    """Palette index of a color given by name or index."""
    if isinstance(color, str):
        try:
            return COLOR_NAMES.index(color)
        except ValueError:
            raise ConfigError(f"unknown color {color!r}; the palette has {list(COLOR_NAMES)}") from None
    i = int(color)
    if not 0 <= i < len(PALETTE):
        raise ConfigError(f"color index {i} out of range [0, {len(PALETTE)})")
    return i


def _rgb(color: int | str | tuple | np.ndarray) -> np.ndarray:
    if isinstance(color, (str, int, np.integer)):
        return PALETTE_RGB[color_index(color)]
    rgb = np.asarray(color, dtype=np.float32)
    if rgb.shape != (3,):
        raise ConfigError(f"a color must be a palette name, index or an RGB triple, got shape {rgb.shape}")
    return rgb


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)   # (1797, 8, 8) in [0, 1]
    images.setflags(write=False)
    target = d.target.astype(np.int32)
    target.setflags(write=False)
    return images, target


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 8, 8) float32 [0, 1] grey digits and their (n,) labels of one split.

    "train" is the first 80% of `sklearn.datasets.load_digits`, "eval" the last 20%.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    images, target = _load()
    n_train = len(images) - int(round(EVAL_FRACTION * len(images)))
    sl = slice(0, n_train) if split == "train" else slice(n_train, None)
    return images[sl], target[sl]


def render(digit_img: np.ndarray, fg: int | str | tuple = "white", bg: int | str | tuple = "black",
           size: int = IMAGE_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one 8x8 grey digit (values in [0, 1], or sklearn's 0..16) as a colored image.

    The digit is upsampled with a cubic spline (one `affine_transform` that also applies the jitter:
    scale in [0.88, 1.08], shift up to 4/64 of the size, rotation up to 10 degrees; no jitter when
    `rng` is None), then soft-thresholded (a logistic of width ~1.5 px: crisp, anti-aliased strokes)
    into an alpha matte that composites `fg` over `bg`. Returns float32 (size, size, 3) in [0, 1].
    """
    img = np.asarray(digit_img, dtype=np.float32)
    if img.shape != (8, 8):
        raise ConfigError(f"render expects an 8x8 digit, got shape {img.shape}")
    if img.max() > 1.0:
        img = img / 16.0
    scale, shift, theta = 1.0, np.zeros(2), 0.0
    if rng is not None:
        scale = rng.uniform(*_JITTER_SCALE)
        shift = rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT, size=2) * size
        theta = np.deg2rad(rng.uniform(-_JITTER_ROT_DEG, _JITTER_ROT_DEG))
    # Output pixel o maps to input cell coordinate i = c_in + A^-1 (o - c_out - shift),
    # A = (cell size in px) * scale * rotation.
    px_per_cell = _CELL_PX * size * scale
    c, s = np.cos(theta), np.sin(theta)
    inv = np.array([[c, s], [-s, c]]) / px_per_cell
    c_out = np.full(2, (size - 1) / 2.0) + shift
    c_in = np.full(2, 3.5)
    offset = c_in - inv @ c_out
    # Pad so the spline sees zeros outside the 8x8 cell grid (no edge ringing from mode="constant").
    padded = np.pad(img, 2)
    up = ndimage.affine_transform(padded, inv, offset=offset + 2.0, output_shape=(size, size),
                                  order=3, mode="constant", cval=0.0)
    alpha = 1.0 / (1.0 + np.exp(-(up - _THRESHOLD) / _SOFTNESS))
    alpha = alpha.astype(np.float32)[..., None]
    out = alpha * _rgb(fg) + (1.0 - alpha) * _rgb(bg)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def caption(digit: int, fg: int | str, bg: int | str) -> str:
    """'a red 3 on a blue background'."""
    return f"a {COLOR_NAMES[color_index(fg)]} {int(digit)} on a {COLOR_NAMES[color_index(bg)]} background"


def parse_caption(text: str) -> tuple[int, int, int]:
    """The (digit, fg, bg) of a toy caption; a DataError for anything :func:`caption` cannot write."""
    words = text.strip().lower().split()
    ok = (len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background"
          and words[2].isdigit() and int(words[2]) in DIGITS and words[1] in COLOR_NAMES and words[5] in COLOR_NAMES)
    if not ok:
        raise DataError(f"{text!r} is not a toy-world caption (expected e.g. 'a red 3 on a blue background')")
    return int(words[2]), COLOR_NAMES.index(words[1]), COLOR_NAMES.index(words[5])


def _all_combos() -> list[tuple[int, int, int]]:
    return [(d, f, b) for d in DIGITS for f in FG_COLORS for b in BG_COLORS if f != b]


def _is_held_out(digit: int, fg: int, bg: int) -> bool:
    # A fixed arithmetic rule (no RNG): about 1 in 7 triples is held out; each (fg, bg) pair is held
    # out for at most two digits, so every digit, color and pair is still seen in train.
    return (digit + 2 * FG_COLORS.index(fg) + 3 * BG_COLORS.index(bg)) % 7 == 0


def prompt_combos(split: str | None = None) -> list[tuple[int, int, int]]:
    """(digit, fg, bg) triples of a prompt split ("train", "eval", or None for all), sorted."""
    combos = _all_combos()
    if split is None or split == "all":
        return combos
    if split not in SPLITS:
        raise ConfigError(f"prompt split must be one of {SPLITS} or None, got {split!r}")
    want_eval = split == "eval"
    return [t for t in combos if _is_held_out(*t) == want_eval]


def prompt_set(split: str | None = None) -> list[str]:
    """All distinct captions of a prompt split: "train" (in-domain), "eval" (held-out combinations,
    out of domain), or None / "all". Deterministic order (digit, fg, bg)."""
    return [caption(*t) for t in prompt_combos(split)]


def sample_dataset(n: int, seed: int = 0, split: str = "train", prompt_split: str | None = "same",
                   size: int = IMAGE_SIZE, jitter: bool = True) -> DigitsSample:
    """`n` random colored digits: images (n, size, size, 3) float32, captions, labels (n, 3) int32.

    Digit images come from `split` of the sklearn samples ("train": first 80%, "eval": last 20%),
    with the caption's digit the image's true label. The (fg, bg) colors are drawn uniformly from
    the prompt combinations of `prompt_split` for that digit ("same" = same as `split`, "train",
    "eval", or None for all combinations; fg != bg always). Deterministic in (n, seed, split, ...).
    """
    images8, targets = load_split(split)
    combos = prompt_combos(split if prompt_split == "same" else prompt_split)
    by_digit: dict[int, list[tuple[int, int]]] = {d: [] for d in DIGITS}
    for d, f, b in combos:
        by_digit[d].append((f, b))
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    out = np.empty((n, size, size, 3), dtype=np.float32)
    labels = np.empty((n, 3), dtype=np.int32)
    captions = []
    for k in range(n):
        j = int(rng.integers(len(images8)))
        d = int(targets[j])
        pairs = by_digit[d]
        f, b = pairs[int(rng.integers(len(pairs)))]
        out[k] = render(images8[j], f, b, size=size, rng=rng if jitter else None)
        labels[k] = (d, f, b)
        captions.append(caption(d, f, b))
    return DigitsSample(out, captions, labels)


def vocabulary() -> list[str]:
    """Every word of every caption, in a fixed order."""
    return ["a", "on", "background", *[str(d) for d in DIGITS], *COLOR_NAMES]


def eval_combos(n: int) -> list[tuple[int, int, int]]:
    """The ``n`` fixed evaluation prompts of a training run: half in-domain (spread over the train
    combinations), half held-out (spread over the eval combinations), as (digit, fg, bg)."""
    n_out = n // 2
    n_in = n - n_out
    train, held_out = prompt_combos("train"), prompt_combos("eval")
    return (train[:: max(1, len(train) // max(1, n_in))][:n_in]
            + held_out[:: max(1, len(held_out) // max(1, n_out))][:n_out])
