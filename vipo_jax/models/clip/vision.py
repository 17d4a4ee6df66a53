"""CLIP vision encoder (transformers ``CLIPVisionModel``; also open_clip's ``VisionTransformer``
with ``pool_type="tok"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.clip.config import CLIPVisionConfig
from vipo_jax.models.clip.layers import TOKENS, layer_norm, make_layers, run_layers
from vipo_jax.nn.annotate import conv_init
from vipo_jax.sharding.rules import constrain


class CLIPVisionModel(nnx.Module):
    """``__call__(pixel_values) -> (last_hidden_state, pooled_output)``.

    ``pixel_values`` are **NHWC** (batch, image_size, image_size, channels), already normalised
    (see :func:`vipo_jax.rewards.clip_scores.preprocess`); transformers takes NCHW. Patches go
    through a stride-``patch_size`` convolution, a class token is prepended, position embeddings
    added, then ``pre_layrnorm`` (sic, transformers' name), the encoder, and ``post_layernorm`` on
    the class token gives ``pooled_output``. ``last_hidden_state`` is the encoder output without
    the post norm, as in transformers."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.hidden_size
        p = cfg.patch_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                        padding="VALID", use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                        param_dtype=pdt, rngs=rngs, **conv_init())
        self.class_embedding = nnx.Param(d**-0.5 * jax.random.normal(rngs.params(), (d,), pdt),
                                         out_sharding=("embed",))
        self.position_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.num_patches + 1, d), pdt), out_sharding=(None, "embed"))
        self.pre_layrnorm = layer_norm(cfg, rngs)
        self.layers = make_layers(cfg, rngs)
        self.post_layernorm = layer_norm(cfg, rngs)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}), "
                             f"got shape {tuple(pixel_values.shape)}")
        dtype = jnp.dtype(cfg.dtype)
        b = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.astype(dtype))  # (B, g, g, D)
        x = x.reshape(b, -1, cfg.hidden_size)  # row-major patches, like torch flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dtype)[None]
        x = constrain(self.pre_layrnorm(x), TOKENS)
        x = run_layers(self.layers, x, None, cfg)
        return x, self.post_layernorm(x[:, 0])
