"""Dual-tower CLIP (transformers ``CLIPModel``; open_clip ``CLIP`` after conversion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.clip.config import CLIPConfig
from vipo_jax.models.clip.text import CLIPTextModel
from vipo_jax.models.clip.vision import CLIPVisionModel
from vipo_jax.nn.annotate import linear_init


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIPModel(nnx.Module):
    """Text and vision towers, bias-free projections to ``projection_dim``, and ``logit_scale``
    (stored as the log, like both references)."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text_model = CLIPTextModel(cfg.text_config, rngs=rngs)
        self.vision_model = CLIPVisionModel(cfg.vision_config, rngs=rngs)
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  rngs=rngs)
        self.text_projection = nnx.Linear(cfg.text_config.hidden_size, cfg.projection_dim, **kw,
                                          **linear_init("embed", None))
        self.visual_projection = nnx.Linear(cfg.vision_config.hidden_size, cfg.projection_dim, **kw,
                                            **linear_init("embed", None))
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, jnp.dtype(cfg.param_dtype)),
                                     out_sharding=())

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected pooled text features (not normalised), (batch, projection_dim)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected pooled image features (not normalised) from NHWC ``pixel_values``."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(logits_per_image, logits_per_text)``: ``exp(logit_scale)`` times the cosine similarity
        of every image with every text, float32."""
        img = l2_normalize(self.get_image_features(pixel_values))
        txt = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = jnp.exp(self.logit_scale[...].astype(jnp.float32)) * (txt @ img.T)
        return logits_per_text.T, logits_per_text
