"""Qwen2-VL (vision tower + language model) in Flax NNX, for video inputs.

``Qwen2VLModel(cfg, rngs=nnx.Rngs(0))``;
``model(input_ids, pixel_values_videos, grid, attention_mask=None, position_ids=None)`` -> the last
hidden state (B, L, hidden_size). Row ``b`` of ``pixel_values_videos`` (B, t * h * w, patch_dim)
is the video of row ``b`` of ``input_ids``; its ``t * h * w / 4`` merged tokens replace, in order,
the ``video_token_id`` placeholders of that row (transformers' ``masked_scatter`` of the video
features into the placeholder positions; every row must hold exactly that many placeholders).
Without video the model is the language model alone. ``lm_head`` is not part of this port (the
reward models read hidden states).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.qwen2_vl.config import Qwen2VLConfig
from vipo_jax.models.qwen2_vl.text import Qwen2VLTextModel
from vipo_jax.models.qwen2_vl.vision import Qwen2VLVisionModel


def scatter_video(embeds: jax.Array, is_video: jax.Array, video: jax.Array) -> jax.Array:
    """Put ``video`` (B, Nv, D) into the positions where ``is_video`` (B, L) is true, in order."""
    idx = jnp.clip(jnp.cumsum(is_video.astype(jnp.int32), axis=1) - 1, 0, video.shape[1] - 1)
    gathered = jnp.take_along_axis(video.astype(embeds.dtype), idx[..., None], axis=1)
    return jnp.where(is_video[..., None], gathered, embeds)


class Qwen2VLModel(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = Qwen2VLVisionModel(cfg.vision_config, rngs=rngs)
        self.language_model = Qwen2VLTextModel(cfg.text_config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, pixel_values_videos: jax.Array | None = None,
                 grid: Sequence[int] | None = None, *, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        embeds = self.language_model.embed(input_ids)
        if pixel_values_videos is not None:
            if grid is None:
                raise ValueError("Qwen2-VL: pixel_values_videos needs its (t, h, w) grid")
            if pixel_values_videos.shape[0] != input_ids.shape[0]:
                raise ValueError(f"Qwen2-VL: {pixel_values_videos.shape[0]} videos for {input_ids.shape[0]} rows "
                                 "of input_ids (one video per row)")
            video = self.visual(pixel_values_videos, grid)
            embeds = scatter_video(embeds, input_ids == self.config.video_token_id, video)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
