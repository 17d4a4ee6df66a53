"""Toy-world rewards and metrics over images in [0, 1], layout (B, H, W, 3), in jax.numpy, and their
entries in the reward registry (``vipo_jax.rewards.registry``; the pixel reward ``redness`` lives in
``vipo_jax.rewards.pixels``):

- ``toy_clip`` (reward): cosine of the toy CLIP's image and caption features.
- ``digit_accuracy`` (metric): 1 where the toy digit classifier reads the prompted digit.
- ``digit_logprob`` (reward): the classifier's log-probability of the prompted digit (a structure
  reward: it rises when the digit is drawn more legibly).
- ``digit_accuracy_eval`` (metric): ``digit_accuracy`` read by a second, independently trained
  classifier (``classifier_eval``), so a run that trains on the first one's log-probability is not
  graded by the model it optimised.
- ``color_match`` (metric): whether an image's dominant foreground / background colors are the prompted ones.
  Background color = per-channel median of the border pixels (a 4-pixel ring at 64x64; the
  digits keep a margin); foreground color = mean of the 10% of pixels farthest (Euclidean RGB)
  from that background color, i.e. the stroke interiors. Each is snapped to the nearest palette
  color (`vipo_jax.toy.digits.PALETTE`); the score is (fg correct + bg correct) / 2, in {0, .5, 1}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.clip.model import l2_normalize
from vipo_jax.rewards.clip_scores import preprocess as clip_preprocess
from vipo_jax.rewards.frames import per_frame_scores
from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register
from vipo_jax.text.tokenizers import load_tokenizer, tokenize
from vipo_jax.toy import assets
from vipo_jax.toy.digits import PALETTE_RGB, parse_caption
from vipo_jax.toy.tokenizer import CLIP_MAX_LENGTH
from vipo_jax.toy.video import READOUT_SIZE

#: Border ring width as a fraction of the image side (4 px at 64).
BORDER_FRACTION = 1.0 / 16.0
#: Fraction of pixels (farthest from the background color) averaged for the foreground color.
FG_FRACTION = 0.10


def _nearest_palette(rgb: jax.Array) -> jax.Array:
    pal = jnp.asarray(PALETTE_RGB)
    d = jnp.sum((rgb[..., None, :] - pal) ** 2, axis=-1)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


@jax.jit
def dominant_colors(images01: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(B, H, W, 3) -> (fg_idx, bg_idx, fg_rgb, bg_rgb): estimated palette indices (B,) int32 and
    the raw estimated colors (B, 3), as defined in the module docstring."""
    x = jnp.asarray(images01, jnp.float32)
    b, h, w, _ = x.shape
    k = max(1, int(round(BORDER_FRACTION * min(h, w))))
    border = jnp.concatenate([
        x[:, :k].reshape(b, -1, 3), x[:, -k:].reshape(b, -1, 3),
        x[:, k:-k, :k].reshape(b, -1, 3), x[:, k:-k, -k:].reshape(b, -1, 3)], axis=1)
    bg_rgb = jnp.median(border, axis=1)
    flat = x.reshape(b, h * w, 3)
    dist = jnp.sum((flat - bg_rgb[:, None, :]) ** 2, axis=-1)
    n_fg = max(1, int(round(FG_FRACTION * h * w)))
    _, idx = jax.lax.top_k(dist, n_fg)
    fg_rgb = jnp.mean(jnp.take_along_axis(flat, idx[..., None], axis=1), axis=1)
    return _nearest_palette(fg_rgb), _nearest_palette(bg_rgb), fg_rgb, bg_rgb


@jax.jit
def color_match(images01: jax.Array, fg_idx: jax.Array, bg_idx: jax.Array) -> jax.Array:
    """(B,) float32 in {0, 0.5, 1}: half a point for the foreground color being the prompted palette
    index `fg_idx` (B,), half for the background being `bg_idx` (B,)."""
    fg_hat, bg_hat, _, _ = dominant_colors(images01)
    fg_ok = (fg_hat == jnp.asarray(fg_idx)).astype(jnp.float32)
    bg_ok = (bg_hat == jnp.asarray(bg_idx)).astype(jnp.float32)
    return 0.5 * (fg_ok + bg_ok)


# --- per frame (the video toy world reads each 32x32 frame at the image world's 64x64) ---------------
def digit_accuracy_frames(classifier: Any, videos: jax.Array, digits: jax.Array, size: int = READOUT_SIZE) -> jax.Array:
    """(B, T) 1 where the toy classifier reads the prompted digit in that frame (upsampled to
    ``size``, the classifier's input size)."""
    fn = lambda _, im, rows: (jnp.argmax(classifier(im), -1) == rows["d"]).astype(jnp.float32)  # noqa: E731
    return per_frame_scores(fn, None, videos, {"d": jnp.asarray(digits)}, size=size)


def color_match_frames(videos: jax.Array, fg: jax.Array, bg: jax.Array, size: int = READOUT_SIZE) -> jax.Array:
    """(B, T) colour match (:func:`color_match`) of every frame."""
    fn = lambda _, im, rows: color_match(im, rows["fg"], rows["bg"])  # noqa: E731
    return per_frame_scores(fn, None, videos, {"fg": jnp.asarray(fg), "bg": jnp.asarray(bg)}, size=size)


def toy_clip_score(clip: Any, images: jax.Array, clip_ids: jax.Array) -> jax.Array:
    """(B,) cosine of the toy CLIP's normalised image and caption features."""
    img = l2_normalize(clip.get_image_features(clip_preprocess(images, clip.cfg.vision_config.image_size)))
    txt = l2_normalize(clip.get_text_features(clip_ids))
    return jnp.sum(img * txt, axis=-1)


def toy_clip_video(clip: Any, videos: jax.Array, clip_ids: jax.Array, size: int = READOUT_SIZE) -> jax.Array:
    """Toy CLIP score averaged over frames, (B,); the caption features computed once per clip."""
    txt = l2_normalize(clip.get_text_features(clip_ids))

    def fn(_, im, rows):
        img = l2_normalize(clip.get_image_features(clip_preprocess(im, clip.cfg.vision_config.image_size)))
        return jnp.sum(img * rows["txt"], axis=-1)

    return jnp.mean(per_frame_scores(fn, None, videos, {"txt": txt}, size=size), axis=1)


# --- registry entries ----------------------------------------------------------------------------------
def labels_of(texts: list[str]) -> dict[str, np.ndarray]:
    """Per caption: (digit, foreground colour, background colour) palette indices, ``labels`` (N, 3)."""
    return {"labels": np.asarray([parse_caption(t) for t in texts], np.int32).reshape(-1, 3)}


_LABELS = {"labels": jax.ShapeDtypeStruct((3,), jnp.int32)}


def _load_toy_clip(ctx: RewardContext) -> LoadedReward:
    root = assets.assets_dir(ctx.toy_assets)
    graphdef, params = nnx.split(assets.load("clip", root))
    tok = load_tokenizer(root / "tokenizer")

    def score(p, images, batch):
        return toy_clip_score(nnx.merge(graphdef, p), images, batch["clip_ids"])

    def video_score(p, videos, batch):
        return toy_clip_video(nnx.merge(graphdef, p), videos, batch["clip_ids"])

    return LoadedReward(score=score, params=params, video_score=video_score,
                        prompt_inputs=lambda texts: {"clip_ids": tokenize(tok, texts, CLIP_MAX_LENGTH)[0]},
                        input_specs={"clip_ids": jax.ShapeDtypeStruct((CLIP_MAX_LENGTH,), jnp.int32)})


def _classifier_reward(folder: str, fn: Any) -> Any:
    """A reward of a toy classifier's logits: ``fn(logits, digits) -> (B,)``; videos per frame."""
    def load(ctx: RewardContext) -> LoadedReward:
        graphdef, params = nnx.split(assets.load(folder, assets.assets_dir(ctx.toy_assets)))

        def score(p, images, batch):
            return fn(nnx.merge(graphdef, p)(images), batch["labels"][:, 0])

        def video_score(p, videos, batch):
            clf = nnx.merge(graphdef, p)
            frames = per_frame_scores(lambda _, im, rows: fn(clf(im), rows["d"]), None, videos,
                                      {"d": batch["labels"][:, 0]}, size=READOUT_SIZE)
            return jnp.mean(frames, axis=1)

        return LoadedReward(score=score, params=params, video_score=video_score, prompt_inputs=labels_of,
                            input_specs=_LABELS, params_key=f"reward/{folder}")

    return load


def digit_logprob(logits: jax.Array, digits: jax.Array) -> jax.Array:
    """(B,) log-softmax of the classifier's logits at the prompted digit."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, digits[:, None].astype(jnp.int32), axis=-1)[:, 0]


def digit_hits(logits: jax.Array, digits: jax.Array) -> jax.Array:
    """(B,) 1 where the classifier's argmax is the prompted digit."""
    return (jnp.argmax(logits, -1) == digits).astype(jnp.float32)


def _load_color_match(ctx: RewardContext) -> LoadedReward:
    def score(p, images, batch):
        return color_match(images, batch["labels"][:, 1], batch["labels"][:, 2])

    def video_score(p, videos, batch):
        return jnp.mean(color_match_frames(videos, batch["labels"][:, 1], batch["labels"][:, 2]), axis=1)

    return LoadedReward(score=score, video_score=video_score, prompt_inputs=labels_of, input_specs=_LABELS)


register(RewardEntry("toy_clip", _load_toy_clip, "toy CLIP: cosine of the toy CLIP's image and caption features",
                     sources=("toy",), monitor=True))
register(RewardEntry("digit_accuracy", _classifier_reward("classifier", digit_hits),
                     "1 where the toy digit classifier reads the prompted digit (the structure metric)",
                     sources=("toy",), trainable=False, monitor=True))
register(RewardEntry("color_match", _load_color_match,
                     "half a point each for the prompted foreground and background colours",
                     sources=("toy",), trainable=False))
register(RewardEntry("digit_logprob", _classifier_reward("classifier", digit_logprob),
                     "log-probability of the prompted digit under the toy classifier (a structure reward)",
                     sources=("toy",), monitor=True))
register(RewardEntry("digit_accuracy_eval", _classifier_reward("classifier_eval", digit_hits),
                     "digit_accuracy read by a second, independently trained classifier (grades digit_logprob runs)",
                     sources=("toy",), trainable=False, monitor=True))
