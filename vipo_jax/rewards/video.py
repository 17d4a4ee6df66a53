"""Video rewards: image rewards scored on every frame and averaged over frames, plus the interface
of a native video reward model (VideoAlign), which is not ported.

Videos are ``(B, T, H, W, 3)`` float in [0, 1] (what the Wan VAE's ``decode_to_unit`` gives). A
per-frame reward flattens the frames into an image batch, repeats each sample's inputs (prompt
tokens, labels) for its frames, scores, and averages over time; ``frame_stride`` scores every k-th
frame only (the first frame always) and ``frames_per_call`` bounds how many frames of each sample
go through the image model at once (a ``lax.map`` over frame chunks, for long real clips).

The ViPO paper trains Wan2.1 with VideoAlign's VQ (visual quality) and MQ (motion quality)
heads. VideoAlign is a Qwen2-VL-2B reward model; its port is a separate piece of work. Its place
in the registry (:data:`VIDEO_REWARD_MODELS`) says what the port has to provide, and asking for it
stops with a :class:`~vipo_jax.errors.ConfigError` that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError

Array = jax.Array
#: ``fn(frozen, images (N, H, W, 3), batch) -> (N,)``: an image reward, batch rows per image.
ImageRewardFn = Callable[[Any, Array, dict], Array]
#: ``fn(frozen, videos (B, T, H, W, 3), batch) -> (B,)``: a video reward, batch rows per video.
VideoRewardFn = Callable[[Any, Array, dict], Array]


def frame_indices(num_frames: int, frame_stride: int = 1) -> tuple[int, ...]:
    """The frames a per-frame reward scores: 0, k, 2k, ... (and always the last one)."""
    if frame_stride < 1:
        raise ConfigError(f"frame_stride must be >= 1, got {frame_stride}")
    idx = list(range(0, num_frames, frame_stride))
    if idx[-1] != num_frames - 1:
        idx.append(num_frames - 1)
    return tuple(idx)


def resize_frames(images: Array, size: int | None) -> Array:
    """(N, H, W, 3) -> (N, size, size, 3), bilinear with antialiasing; ``None`` keeps the size."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, images.shape[-1]),
                            method="linear", antialias=True)


def map_frames(fn: Callable[[Array], Array], videos: Array, frames_per_call: int = 0) -> Array:
    """``fn`` over the frames of ``videos`` (B, T, ...): ``fn`` takes (B * c, ...) frames and returns
    (B * c, ...) per-frame outputs, stacked back to (B, T, ...). ``frames_per_call`` c bounds how many
    frames of each video go in at once (a ``lax.map`` over chunks of time; 0: all)."""
    b, t = videos.shape[:2]
    c = t if frames_per_call in (0, None) or frames_per_call >= t else int(frames_per_call)
    if t % c:
        raise ConfigError(f"frames_per_call={frames_per_call} must divide the {t} frames")

    def run(fr: Array) -> Array:  # (B, c, ...) -> (B, c, ...)
        out = fn(fr.reshape((b * c,) + fr.shape[2:]))
        return out.reshape((b, c) + out.shape[1:])

    if c == t:
        return run(videos)
    parts = jnp.moveaxis(videos.reshape((b, t // c, c) + videos.shape[2:]), 1, 0)
    out = jax.lax.map(run, parts)  # (n, B, c, ...)
    return jnp.moveaxis(out, 0, 1).reshape((b, t) + out.shape[3:])


def per_frame_scores(fn: ImageRewardFn, frozen: Any, videos: Array, batch: dict, *, frame_stride: int = 1,
                     frames_per_call: int = 0, size: int | None = None) -> Array:
    """(B, T') scores of an image reward on the selected frames of each video (see module doc)."""
    videos = jnp.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"videos must be (B, T, H, W, C), got {videos.shape}")
    frames = jnp.take(videos, jnp.asarray(frame_indices(videos.shape[1], frame_stride)), axis=1)
    b, tt = frames.shape[:2]
    c = tt if frames_per_call in (0, None) or frames_per_call >= tt else int(frames_per_call)
    rows = jax.tree.map(lambda a: jnp.repeat(a, c, axis=0), batch)  # each video's inputs, per frame

    def score(imgs: Array) -> Array:
        return fn(frozen, resize_frames(imgs, size), rows).astype(jnp.float32)

    return map_frames(score, frames, frames_per_call)


def per_frame(fn: ImageRewardFn, *, frame_stride: int = 1, frames_per_call: int = 0,
              size: int | None = None) -> VideoRewardFn:
    """An image reward as a video reward: the mean of its per-frame scores (module docstring)."""

    def video_fn(frozen: Any, videos: Array, batch: dict) -> Array:
        return jnp.mean(per_frame_scores(fn, frozen, videos, batch, frame_stride=frame_stride,
                                         frames_per_call=frames_per_call, size=size), axis=1)

    video_fn.__name__ = f"per_frame_{getattr(fn, '__name__', 'reward')}"
    return video_fn


# --- CLIP-family rewards per frame (HPSv2.1, PickScore, CLIP score) -------------------------------
def clip_family_video(model: Any, videos: Array, text_ids: Array, kind: str, *, frame_stride: int = 1,
                      frames_per_call: int = 0, attention_mask: Array | None = None) -> Array:
    """Mean over frames of an image-text score (``kind``: hps_v21, pickscore, clip_score) of each
    video with its prompt, (B,). The text features are computed once per video, not per frame."""
    from vipo_jax.rewards.clip_scores import image_embeds, score_from_embeds, text_embeds

    txt = text_embeds(model, text_ids, attention_mask)  # (B, P)

    def frame_fn(_, images, rows):
        return score_from_embeds(model, image_embeds(model, images), rows["txt"], kind)

    return jnp.mean(per_frame_scores(frame_fn, None, videos, {"txt": txt}, frame_stride=frame_stride,
                                     frames_per_call=frames_per_call), axis=1)


def hps_v21_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """HPSv2.1 averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "hps_v21", **kw)


def pickscore_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """PickScore averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "pickscore", **kw)


def clip_score_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """CLIP score (``100 * max(cos, 0)``) averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "clip_score", **kw)


# --- toy-world rewards and metrics per frame ---------------------------------------------------------
def redness_video(videos: Array) -> Array:
    """Mean over frames and pixels of R - (G + B) / 2, (B,)."""
    x = jnp.asarray(videos, jnp.float32)
    return jnp.mean(x[..., 0] - 0.5 * (x[..., 1] + x[..., 2]), axis=(1, 2, 3))


def digit_accuracy_frames(classifier: Any, videos: Array, digits: Array, size: int = 64) -> Array:
    """(B, T) 1 where the toy classifier reads the prompted digit in that frame (upsampled to
    ``size``, the classifier's input size)."""
    fn = lambda _, im, rows: (jnp.argmax(classifier(im), -1) == rows["d"]).astype(jnp.float32)  # noqa: E731
    return per_frame_scores(fn, None, videos, {"d": jnp.asarray(digits)}, size=size)


def color_match_frames(videos: Array, fg: Array, bg: Array, size: int = 64) -> Array:
    """(B, T) toy colour match (:func:`vipo_jax.toy.rewards.color_match`) of every frame."""
    from vipo_jax.toy.rewards import color_match

    fn = lambda _, im, rows: color_match(im, rows["fg"], rows["bg"])  # noqa: E731
    return per_frame_scores(fn, None, videos, {"fg": jnp.asarray(fg), "bg": jnp.asarray(bg)}, size=size)


def toy_clip_video(clip: Any, videos: Array, clip_ids: Array, size: int = 64) -> Array:
    """Toy CLIP score (cosine of normalised features) averaged over frames, (B,)."""
    from vipo_jax.models.clip.model import l2_normalize
    from vipo_jax.rewards.clip_scores import preprocess

    txt = l2_normalize(clip.get_text_features(clip_ids))

    def fn(_, im, rows):
        img = l2_normalize(clip.get_image_features(preprocess(im, clip.cfg.vision_config.image_size)))
        return jnp.sum(img * rows["txt"], axis=-1)

    return jnp.mean(per_frame_scores(fn, None, videos, {"txt": txt}, size=size), axis=1)


# --- native video reward models ------------------------------------------------------------------------
VIDEOALIGN_INTERFACE = """\
A video reward model plugs in as `fn(frozen, videos, batch) -> (B,) float32`: `videos` are the
decoded clips (B, T, H, W, 3) in [0, 1] at the generation resolution and frame count, `frozen`
the pytree of frozen parameters (its weights under `frozen["reward_<name>"]`), `batch` the
per-sample prompt inputs the world tokenizes for it (e.g. `batch["videoalign_ids"]`). VideoAlign
(KwaiVGI/VideoAlign, a Qwen2-VL-2B with VQ / MQ / TA heads) needs: a Flax port of Qwen2-VL's
vision tower and language model, its video preprocessing (fps-based frame sampling, 448x448-ish
dynamic resolution, 2x2 token merging) on device, the reward-head readout and the `use_norm`
z-scoring with the checkpoint's means/stds (as the ViPO Wan script calls it); then register the
heads here (videoalign_vq: visual quality, videoalign_mq: motion quality) with the world's
tokenizer step. Until then train with a per-frame image reward (hpsv21, pickscore, clip_score)."""


def _not_ported(name: str) -> Callable[..., VideoRewardFn]:
    def factory(*args: Any, **kwargs: Any) -> VideoRewardFn:
        raise ConfigError(f"reward {name!r}: the VideoAlign video reward model is not ported yet.\n"
                          + VIDEOALIGN_INTERFACE)

    return factory


#: Native video reward models by reward name: ``factory(config, ...) -> VideoRewardFn``.
VIDEO_REWARD_MODELS: dict[str, Callable[..., VideoRewardFn]] = {
    "videoalign_vq": _not_ported("videoalign_vq"),
    "videoalign_mq": _not_ported("videoalign_mq"),
}
#: Image rewards that a video world scores per frame.
PER_FRAME_REWARDS = ("hpsv21", "pickscore", "clip_score")
