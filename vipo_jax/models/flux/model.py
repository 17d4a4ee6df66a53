"""The FLUX.1 DiT in Flax NNX, numerically equal to diffusers' ``FluxTransformer2DModel``.

Layout notes (for converters and sharding rules):

* q, k and v of each stream are one fused projection, ``(dim, 3 * heads * head_dim)`` with output
  order ``(3, heads, head_dim)``, as in the original BFL checkpoint; the single-stream block's
  ``linear1`` fuses q, k, v and the MLP input projection, ``linear2`` takes ``[attn, mlp]``.
* The modulation vectors are ordered as in diffusers (``shift, scale, gate`` per branch; the
  final ``norm_out`` is ``scale, shift``).
* Double blocks live in ``transformer_blocks`` and single blocks in ``single_transformer_blocks``,
  each a stack (leading layer axis) run with ``jax.lax.scan``.

LayerNorm, RMSNorm, the modulation, RoPE and the softmax are computed in float32; matmuls use the
compute dtype ``cfg.dtype``; the residual stream is carried in the compute dtype. The returned
velocity is float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.flux.config import FluxConfig
from vipo_jax.nn.annotate import linear_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.lora import Linear
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

_EPS = 1e-6


_TOKENS = ("batch", "length", "act_embed")  # the residual streams (B, L, D)
_HEADS = ("batch", "length", "act_heads", None)  # q, k, v (B, L, H, head_dim)
_HIDDEN = ("batch", "length", "act_mlp")  # MLP hidden (B, L, F)


def _linear(cfg: FluxConfig, n_in: int, n_out: int, rngs: nnx.Rngs, names: tuple) -> Linear:
    """``names``: the logical axis names of the kernel (in, out) (docs/PORTING.md)."""
    return Linear(n_in, n_out, use_bias=True, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **linear_init(*names))


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _EPS)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """``LayerNorm(x) * (1 + scale) + shift`` in float32; shift/scale are (B, D)."""
    y = _layer_norm(x) * (1.0 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
    return y.astype(dtype)


def _gate(x: jax.Array, gate: jax.Array) -> jax.Array:
    return gate[:, None].astype(x.dtype) * x


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (``torch.nn.RMSNorm``, eps 1e-6), in float32."""

    def __init__(self, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS)
        return x * self.scale[...].astype(jnp.float32)


class MLPEmbedder(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, cfg: FluxConfig, n_in: int, dim: int, rngs: nnx.Rngs):
        self.linear_1 = _linear(cfg, n_in, dim, rngs, (None, "mlp"))
        self.linear_2 = _linear(cfg, dim, dim, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class FeedForward(nnx.Module):
    """dim -> 4 dim -> GELU(tanh) -> dim."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        self.linear_in = _linear(cfg, cfg.inner_dim, cfg.mlp_hidden_dim, rngs, ("embed", "mlp"))
        self.linear_out = _linear(cfg, cfg.mlp_hidden_dim, cfg.inner_dim, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.gelu(self.linear_in(x), approximate=True), _HIDDEN)
        return self.linear_out(h)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos, sin]`` (diffusers ``Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)``), in float32. ``t`` is already scaled to [0, 1000]."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope_tables(ids: jax.Array, axes_dims: tuple[int, ...], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, (B, L, head_dim // 2), float32, from position ids
    (B, L, n_axes): axis ``i`` uses ``axes_dims[i]`` channels (``axes_dims[i] // 2`` frequencies)."""
    pos = ids.astype(jnp.float32)
    angles = []
    for i, d in enumerate(axes_dims):
        omega = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        angles.append(pos[..., i : i + 1] * omega)
    angles = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs of ``x`` (B, L, H, D) in float32; cos/sin are (B, L, D/2)."""
    x = x.astype(jnp.float32)
    xr = x.reshape(*x.shape[:-1], -1, 2)
    re, im = xr[..., 0], xr[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape)


class QKVProjection(nnx.Module):
    """Fused q, k, v projection followed by per-head RMS q/k norms."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        self.qkv = _linear(cfg, cfg.inner_dim, 3 * cfg.inner_dim, rngs, ("embed", "heads"))
        self.norm_q = RMSNorm(cfg.attention_head_dim, jnp.dtype(cfg.param_dtype))
        self.norm_k = RMSNorm(cfg.attention_head_dim, jnp.dtype(cfg.param_dtype))
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim

    def __call__(self, x: jax.Array):
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        return constrain(self.norm_q(q), _HEADS), constrain(self.norm_k(k), _HEADS), constrain(v, _HEADS)


def _attend(cfg: FluxConfig, q, k, v, cos, sin) -> jax.Array:
    """RoPE (float32) then softmax attention; q, k, v are (B, L, H, D). Returns (B, L, H * D)."""
    dtype = jnp.dtype(cfg.dtype)
    q = apply_rope(q, cos, sin).astype(dtype)
    k = apply_rope(k, cos, sin).astype(dtype)
    out = attention(q, k, v.astype(dtype), implementation=cfg.attention)
    return out.reshape(*out.shape[:2], -1).astype(dtype)


class DoubleStreamBlock(nnx.Module):
    """diffusers ``FluxTransformerBlock``: separate weights for the image and text streams, one
    joint attention over ``[txt, img]``."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.cfg = cfg
        self.img_mod = _linear(cfg, d, 6 * d, rngs, ("embed", "mlp"))
        self.txt_mod = _linear(cfg, d, 6 * d, rngs, ("embed", "mlp"))
        self.img_attn = QKVProjection(cfg, rngs)
        self.txt_attn = QKVProjection(cfg, rngs)
        self.img_attn_out = _linear(cfg, d, d, rngs, ("heads", "embed"))
        self.txt_attn_out = _linear(cfg, d, d, rngs, ("heads", "embed"))
        self.img_mlp = FeedForward(cfg, rngs)
        self.txt_mlp = FeedForward(cfg, rngs)

    def __call__(self, carry, vec, cos, sin):
        txt, img = constrain(carry[0], _TOKENS), constrain(carry[1], _TOKENS)
        dtype = jnp.dtype(self.cfg.dtype)
        n_txt = txt.shape[1]
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = jnp.split(self.img_mod(vec), 6, axis=-1)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = jnp.split(self.txt_mod(vec), 6, axis=-1)

        iq, ik, iv = self.img_attn(_modulate(img, i_shift, i_scale, dtype))
        tq, tk, tv = self.txt_attn(_modulate(txt, t_shift, t_scale, dtype))
        q = jnp.concatenate([tq, iq], axis=1)
        k = jnp.concatenate([tk, ik], axis=1)
        v = jnp.concatenate([tv, iv], axis=1)
        attn = _attend(self.cfg, q, k, v, cos, sin)
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + _gate(self.img_attn_out(img_attn), i_gate)
        img = img + _gate(self.img_mlp(_modulate(img, i_shift2, i_scale2, dtype)), i_gate2)
        txt = txt + _gate(self.txt_attn_out(txt_attn), t_gate)
        txt = txt + _gate(self.txt_mlp(_modulate(txt, t_shift2, t_scale2, dtype)), t_gate2)
        return constrain(txt, _TOKENS), constrain(img, _TOKENS)


class SingleStreamBlock(nnx.Module):
    """diffusers ``FluxSingleTransformerBlock`` on the concatenated ``[txt, img]`` sequence:
    parallel attention and MLP from one fused input projection."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.cfg = cfg
        self.modulation = _linear(cfg, d, 3 * d, rngs, ("embed", "mlp"))
        self.linear1 = _linear(cfg, d, 3 * d + cfg.mlp_hidden_dim, rngs, ("embed", "mlp"))
        self.linear2 = _linear(cfg, d + cfg.mlp_hidden_dim, d, rngs, ("mlp", "embed"))
        self.norm_q = RMSNorm(cfg.attention_head_dim, jnp.dtype(cfg.param_dtype))
        self.norm_k = RMSNorm(cfg.attention_head_dim, jnp.dtype(cfg.param_dtype))

    def __call__(self, x, vec, cos, sin):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.inner_dim
        x = constrain(x, _TOKENS)
        shift, scale, gate = jnp.split(self.modulation(vec), 3, axis=-1)
        h = constrain(self.linear1(_modulate(x, shift, scale, dtype)), _HIDDEN)
        qkv = h[..., : 3 * d].reshape(*x.shape[:2], 3, cfg.num_attention_heads, cfg.attention_head_dim)
        mlp = constrain(jax.nn.gelu(h[..., 3 * d :], approximate=True), _HIDDEN)
        q = constrain(self.norm_q(qkv[:, :, 0]), _HEADS)
        k = constrain(self.norm_k(qkv[:, :, 1]), _HEADS)
        attn = _attend(cfg, q, k, constrain(qkv[:, :, 2], _HEADS), cos, sin)
        out = self.linear2(jnp.concatenate([attn, mlp.astype(dtype)], axis=-1))
        return constrain(x + _gate(out, gate), _TOKENS)


class TimeTextEmbedding(nnx.Module):
    """Timestep (+ guidance) sinusoidal MLP embeddings plus the pooled text projection."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        n = cfg.timestep_channels
        self.timestep_embedder = MLPEmbedder(cfg, n, cfg.inner_dim, rngs)
        self.guidance_embedder = MLPEmbedder(cfg, n, cfg.inner_dim, rngs) if cfg.guidance_embeds else None
        self.text_embedder = MLPEmbedder(cfg, cfg.pooled_projection_dim, cfg.inner_dim, rngs)
        self.channels = n
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, timestep, pooled, guidance=None):
        emb = self.timestep_embedder(timestep_embedding(timestep * 1000.0, self.channels).astype(self.dtype))
        if self.guidance_embedder is not None:
            g = timestep_embedding(guidance * 1000.0, self.channels).astype(self.dtype)
            emb = emb + self.guidance_embedder(g)
        return emb + self.text_embedder(pooled)


class AdaNormOut(nnx.Module):
    """diffusers ``AdaLayerNormContinuous`` (no affine, eps 1e-6): ``scale, shift`` order."""

    def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
        self.linear = _linear(cfg, cfg.inner_dim, 2 * cfg.inner_dim, rngs, ("embed", "mlp"))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x, vec):
        scale, shift = jnp.split(self.linear(vec), 2, axis=-1)
        return _modulate(x, shift, scale, self.dtype)


class FluxTransformer(nnx.Module):
    """FLUX.1 [dev] / [schnell] DiT.

    ``model(img, txt, pooled, timestep, img_ids, txt_ids, guidance=None)``:

    * img: (B, N_img, in_channels) packed latent tokens (see ``packing.pack_latents``)
    * txt: (B, N_txt, joint_attention_dim) T5 hidden states
    * pooled: (B, pooled_projection_dim) CLIP pooled embedding
    * timestep: (B,) or scalar sigma in [0, 1] (multiplied by 1000 inside, like diffusers)
    * img_ids, txt_ids: (N, 3) or (B, N, 3) position ids
    * guidance: (B,) or scalar guidance scale (required iff ``cfg.guidance_embeds``)

    Returns the predicted velocity (B, N_img, patch_size**2 * out_channels) in float32.
    """

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.inner_dim
        self.x_embedder = _linear(cfg, cfg.in_channels, d, rngs, (None, "embed"))
        self.context_embedder = _linear(cfg, cfg.joint_attention_dim, d, rngs, (None, "embed"))
        self.time_text_embed = TimeTextEmbedding(cfg, rngs)
        self.transformer_blocks = (
            make_stack(lambda r: DoubleStreamBlock(cfg, r), cfg.num_layers, rngs) if cfg.num_layers else None
        )
        self.single_transformer_blocks = (
            make_stack(lambda r: SingleStreamBlock(cfg, r), cfg.num_single_layers, rngs)
            if cfg.num_single_layers else None
        )
        self.norm_out = AdaNormOut(cfg, rngs)
        self.proj_out = _linear(cfg, d, cfg.out_dim, rngs, ("embed", None))

    def __call__(self, img, txt, pooled, timestep, img_ids, txt_ids, guidance=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        batch = img.shape[0]
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX model has guidance embeddings (dev): pass guidance=(B,) scales")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX model has no guidance embeddings (schnell): pass guidance=None")

        def per_batch(v):
            v = jnp.asarray(v, jnp.float32)
            return jnp.broadcast_to(v, (batch,)) if v.ndim == 0 else v

        def ids3(ids):
            ids = jnp.asarray(ids)
            return ids[None] if ids.ndim == 2 else ids

        timestep = per_batch(timestep)
        guidance = per_batch(guidance) if guidance is not None else None
        temb = self.time_text_embed(timestep, pooled, guidance)
        vec = jax.nn.silu(temb.astype(jnp.float32)).astype(dtype)

        img = constrain(self.x_embedder(img), _TOKENS)
        txt = constrain(self.context_embedder(txt), _TOKENS)
        t_ids, i_ids = ids3(txt_ids), ids3(img_ids)
        if t_ids.shape[0] != i_ids.shape[0]:  # one of them per-batch, the other shared
            t_ids = jnp.broadcast_to(t_ids, (batch, *t_ids.shape[1:]))
            i_ids = jnp.broadcast_to(i_ids, (batch, *i_ids.shape[1:]))
        ids = jnp.concatenate([t_ids, i_ids], axis=1)
        cos, sin = rope_tables(ids, cfg.axes_dims_rope, cfg.rope_theta)

        if self.transformer_blocks is not None:
            txt, img = scan_stack(self.transformer_blocks, (txt, img), vec, cos, sin, remat=cfg.remat)
        n_txt = txt.shape[1]
        x = jnp.concatenate([txt, img], axis=1)
        if self.single_transformer_blocks is not None:
            x = scan_stack(self.single_transformer_blocks, x, vec, cos, sin, remat=cfg.remat)
        img = x[:, n_txt:]
        out = self.proj_out(self.norm_out(img, vec))
        return out.astype(jnp.float32)
