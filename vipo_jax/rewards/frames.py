"""Image rewards on videos: score every (or every k-th) frame and average over frames.

Videos are ``(B, T, H, W, 3)`` float in [0, 1] (what the Wan VAE's ``decode_to_unit`` gives). A
per-frame reward flattens the frames into an image batch, repeats each sample's inputs (prompt
tokens, labels) for its frames, scores, and averages over time; ``frame_stride`` scores every k-th
frame only (the first and the last frame always) and ``frames_per_call`` bounds how many frames of
each sample go through the image model at once (a ``lax.map`` over frame chunks, for long clips).
A world applies this to every image reward of the registry that has no whole-clip ``video_score``.
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
