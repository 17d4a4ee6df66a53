"""ImageReward (THUDM/ImageReward v1.0): BLIP ViT + BLIP text encoder in multimodal mode + a
linear head on the first text token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.blip.config import ImageRewardConfig
from vipo_jax.models.blip.text import BlipTextModel
from vipo_jax.models.blip.vision import BlipVisionModel


def _head_axes(i: int, n: int) -> tuple[str | None, str | None]:
    # Only the first (text width -> 1024) layer is wide enough to be worth splitting.
    if i == 0:
        return ("embed", "mlp")
    return ("mlp", None) if i == 1 else (None, None)


class ImageRewardModel(nnx.Module):
    """``__call__(pixel_values, input_ids, attention_mask) -> (batch,)`` normalised rewards.

    As ``ImageReward.score`` / ``score_gard``: the text encoder reads the tokenized prompt as is
    (its [CLS] first token is *not* replaced by [ENC]), attends to every ViT token, and the head
    (``mlp.layers`` of the release: Linear layers with no activation between them, dropout being
    off at inference) maps the first token's state to one number, standardised with
    ``reward_mean`` / ``reward_std``. The head runs in float32, as the reference's ``.float()``."""

    def __init__(self, cfg: ImageRewardConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual_encoder = BlipVisionModel(cfg.vision_config, rngs=rngs)
        self.text_encoder = BlipTextModel(cfg.text_config, rngs=rngs)
        sizes = (cfg.text_config.hidden_size, *cfg.mlp_hidden_sizes, 1)
        n = len(sizes) - 1
        self.head = nnx.List([
            nnx.Linear(sizes[i], sizes[i + 1], dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                       kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _head_axes(i, n)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, (_head_axes(i, n)[1],)), rngs=rngs)
            for i in range(n)])

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """The ViT's output tokens (batch, 1 + patches, vision width) from normalised NHWC pixels."""
        return self.visual_encoder(pixel_values)

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                      image_embeds: jax.Array) -> jax.Array:
        """The text encoder's first-token state (batch, text width), float32."""
        hidden = self.text_encoder(input_ids, attention_mask, image_embeds)
        return hidden[:, 0].astype(jnp.float32)

    def raw_reward(self, features: jax.Array) -> jax.Array:
        """The head's output before standardisation, (batch,)."""
        x = features.astype(jnp.float32)
        for layer in self.head:
            x = layer(x)
        return x[:, 0]

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        feats = self.text_features(input_ids, attention_mask, self.image_embeds(pixel_values))
        return (self.raw_reward(feats) - self.cfg.reward_mean) / self.cfg.reward_std
