"""Command line: the PSM's advantage maps of your own images, before you rent accelerators.

    python -m vipo_jax.maps --images=DIR --out=DIR [--config=configs/flux.py:toy] \
        [--config.psm.backbone_kind=dinov2 --config.psm.backbone=/data/dinov2-large] \
        [--config.psm.sign_rule=border --config.psm.smooth_sigma=1.0 --config.psm.num_components=3]

Reads every PNG / JPEG / WebP in ``--images`` (resized to ``--size`` when given), runs the configured
PSM backbone and map (docs/METHOD.md §3: per-image PCA, sign rule, reverse min-max, smoothing,
resize to the map grid: ``--grid`` cells per side, default the image side / 8 as FLUX's latent grid),
and writes ``OUT/<name>.map.png`` (the map over the image, and beside it the map alone),
``OUT/<name>.map.npy`` (the map, float32 in [0, 1]), ``OUT/maps.png`` (all images: a row of images,
a row of overlays) and ``OUT/maps.json`` (per image: mean, min, max; whether the input was degenerate
and fell back to the all-ones map). With the toy config (the default) the backbone is the toy
world's DINOv2; the ``latents`` backbone needs generated latents and is not available here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vipo_jax import backbones  # noqa: E402
from vipo_jax.backbones import BackboneContext  # noqa: E402
from vipo_jax.errors import ConfigError, DataError, VipoError  # noqa: E402
from vipo_jax.rl import map_stats, psm_map  # noqa: E402
from vipo_jax.toy import assets  # noqa: E402
from vipo_jax.training.step_config import psm_options  # noqa: E402
from vipo_jax.utils.media import heat_overlay, image_grid, save_png  # noqa: E402
from vipo_jax.worlds import source_of  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/flux.py:toy", "configs/<name>.py[:arg]: its psm section "
                                          "(backbone_kind, backbone, sign_rule, ...)", lock_config=False)
_IMAGES = flags.DEFINE_string("images", None, "folder of images (png, jpg, jpeg, webp)")
_OUT = flags.DEFINE_string("out", None, "output folder")
_SIZE = flags.DEFINE_integer("size", 0, "resize every image to SIZE x SIZE first (0: keep each image's size)")
_GRID = flags.DEFINE_integer("grid", 0, "map cells per side (0: the image side / 8, FLUX's latent grid)")
_SCALE = flags.DEFINE_integer("scale", 0, "pixel repeat of the written PNGs (0: enough for 256 px)")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_images(folder: Path, size: int) -> tuple[list[str], list[np.ndarray]]:
    if not folder.is_dir():
        raise DataError(f"--images={str(folder)!r} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise DataError(f"{folder} holds no image ({', '.join(SUFFIXES)})")
    names, images = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size:
                    im = im.resize((size, size), Image.BICUBIC)
                images.append(np.asarray(im, np.float32) / 255.0)
        except OSError as e:
            raise DataError(f"{p} is not a readable image ({e})") from e
        names.append(p.stem)
    return names, images


def compute_maps(c, images: list[np.ndarray], grid: int) -> list[np.ndarray]:
    """The PSM map of every image (grouped by size: one compile per size)."""
    kind = str(c.psm.get("backbone_kind", "dinov2"))
    entry = backbones.get(kind)
    if entry.reads != "images":
        raise ConfigError(f"--config.psm.backbone_kind={kind!r} reads generated latents; for images use dinov2, "
                          "resnet, sam or pixels")
    source = source_of(c)
    toy = assets.assets_dir() if source == "toy" else None
    ctx = BackboneContext(c, source, toy_assets=toy, dtype=str(c.model.dtype))
    if entry.check is not None:
        entry.check(ctx)
    loaded = entry.load(ctx)
    opts = psm_options(c.psm)
    fns: dict[tuple[int, int], object] = {}
    out = []
    for img in tqdm(images, desc="maps", dynamic_ncols=True):
        h, w = img.shape[:2]
        gh, gw = (grid, grid) if grid else (max(1, h // 8), max(1, w // 8))
        if (h, w) not in fns:
            fns[(h, w)] = jax.jit(lambda x, gh=gh, gw=gw: psm_map(loaded.features(loaded.params, x), (gh, gw), opts))
        out.append(np.asarray(fns[(h, w)](img[None]))[0])
    return out


def main(argv: list[str]) -> None:
    del argv
    if not _IMAGES.value or not _OUT.value:
        raise app.UsageError("--images and --out are required, e.g. --images=my_images --out=runs/maps")
    logging.set_verbosity(logging.WARNING)
    out = Path(_OUT.value)
    try:
        c = _CONFIG.value
        names, images = read_images(Path(_IMAGES.value), _SIZE.value)
        maps = compute_maps(c, images, _GRID.value)
        out.mkdir(parents=True, exist_ok=True)
    except (VipoError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    stats = {}
    for name, img, m in zip(names, images, maps):
        overlay = heat_overlay(img[None], m[None])[0]
        alone = heat_overlay(np.zeros_like(img)[None], m[None], alpha=1.0)[0]
        scale = _SCALE.value or max(1, 256 // max(img.shape[:2]))
        save_png(out / f"{name}.map.png", image_grid(np.stack([overlay, alone]), cols=2), scale=scale)
        np.save(out / f"{name}.map.npy", m.astype(np.float32))
        s = {k: float(v) for k, v in map_stats(m[None]).items()}
        stats[name] = {"mean": s["map_mean"], "min": s["map_min"], "max": s["map_max"],
                       "degenerate": bool(s["map_fallback_frac"] > 0), "grid": list(m.shape)}
    if len({im.shape for im in images}) == 1:
        rows = np.concatenate([np.stack(images), heat_overlay(np.stack(images), np.stack(maps))])
        scale = _SCALE.value or max(1, 128 // max(images[0].shape[:2]))
        save_png(out / "maps.png", image_grid(rows, cols=len(images)), scale=scale)
    (out / "maps.json").write_text(json.dumps({"config": {k: c.psm[k] for k in c.psm}, "maps": stats}, indent=1))
    print(f"{len(maps)} maps in {out} (maps.json, <name>.map.png, <name>.map.npy)")


if __name__ == "__main__":
    app.run(main)
