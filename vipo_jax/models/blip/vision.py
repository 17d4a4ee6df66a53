"""BLIP's image encoder: the timm-style ``VisionTransformer`` of BLIP's ``vit.py`` (also
transformers' ``BlipVisionModel``). Unlike CLIP's ViT it has no pre-norm, a bias on the patch
convolution, and its output is the final-LayerNorm-ed sequence of every token (class token first),
which the BLIP text encoder cross-attends to."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.blip.config import BlipVisionConfig
from vipo_jax.models.blip.layers import ACT_FNS, layer_norm, linear, param, partitioned, split_heads
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack


class ViTAttention(nnx.Module):
    """Multi-head self-attention. The checkpoint's fused ``qkv`` is split into q / k / v at load
    time so that each projection's output is a clean ``heads`` axis for tensor parallelism."""

    def __init__(self, cfg: BlipVisionConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.implementation = cfg.attention
        self.q = linear(cfg, d, d, ("embed", "heads"), rngs)
        self.k = linear(cfg, d, d, ("embed", "heads"), rngs)
        self.v = linear(cfg, d, d, ("embed", "heads"), rngs)
        self.proj = linear(cfg, d, d, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.num_heads
        o = attention(split_heads(self.q(x), h), split_heads(self.k(x), h), split_heads(self.v(x), h),
                      implementation=self.implementation)
        return self.proj(o.reshape(x.shape))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: BlipVisionConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.fc2 = linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACT_FNS[self.act](self.fc1(x)))


class ViTBlock(nnx.Module):
    """Pre-LN block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: BlipVisionConfig, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg, rngs)
        self.attn = ViTAttention(cfg, rngs)
        self.norm2 = layer_norm(cfg, rngs)
        self.mlp = ViTMLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionModel(nnx.Module):
    """``__call__(pixel_values) -> last_hidden_state`` (batch, 1 + num_patches, hidden_size).

    ``pixel_values`` are **NHWC** (batch, image_size, image_size, channels), already normalised
    (see :func:`vipo_jax.rewards.image_reward.preprocess`); the references take NCHW. Patches come
    from a stride-``patch_size`` convolution (row-major, like torch ``flatten(2)``), the class token
    is prepended, position embeddings added, then the blocks and the final ``norm``."""

    def __init__(self, cfg: BlipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nnx.Conv(
            cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
            dtype=jnp.dtype(cfg.dtype), param_dtype=pdt,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            bias_init=partitioned(nnx.initializers.zeros, ("conv_out",)), rngs=rngs)
        self.cls_token = param(rngs, (d,), ("embed",), pdt)
        self.pos_embed = param(rngs, (cfg.num_patches + 1, d), (None, "embed"), pdt)
        self.blocks = make_stack(lambda r: ViTBlock(cfg, r), cfg.num_hidden_layers, rngs)
        self.norm = layer_norm(cfg, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}), "
                             f"got shape {tuple(pixel_values.shape)}")
        dtype = jnp.dtype(cfg.dtype)
        b = pixel_values.shape[0]
        x = self.patch_embed(pixel_values.astype(dtype)).reshape(b, -1, cfg.hidden_size)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dtype)[None]
        x = scan_stack(self.blocks, x, remat=cfg.remat)
        return self.norm(x)
