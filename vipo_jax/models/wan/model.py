"""The Wan2.1 text-to-video DiT in Flax NNX, numerically equal to diffusers' ``WanTransformer3DModel``.

Interface: ``model(latents, timestep, text_states, text_mask=None) -> velocity``.

* ``latents``: ``(B, F, H, W, C)`` **channels-last** latent video (the Wan VAE port uses the same
  layout; diffusers' ``(B, C, F, H, W)`` is ``x.transpose(0, 2, 3, 4, 1)``). ``F`` is the number of
  latent frames (``1 + (frames - 1) / 4`` for the Wan VAE); ``F, H, W`` must be multiples of
  ``patch_size`` (1, 2, 2).
* ``timestep``: ``(B,)`` (or a scalar) in the diffusers scale [0, 1000] (``sigma * 1000``).
* ``text_states``: ``(B, L, text_dim)`` UMT5 hidden states.
* ``text_mask``: optional ``(B, L)``, 1 for prompt tokens. Masked positions are **zeroed**, which is
  exactly what diffusers' ``WanPipeline`` does to the text encoder's output (it cuts each prompt at
  its length and pads with zero vectors to ``max_sequence_length=512``). The transformer itself
  uses **no attention mask**: every one of the L tokens is attended to, and a zero vector becomes
  ``text_embedder(0)``, a non-zero constant token. To reproduce the reference, pass L = 512 tokens,
  zero (or masked) after each prompt.

Returns the velocity ``(B, F, H, W, out_channels)`` in float32.

Layout notes (for converters and sharding rules): parameter names follow diffusers (``blocks`` is
a stack with a leading layer axis, run with ``jax.lax.scan``); q, k and v are separate projections,
and the q/k RMSNorms act on all heads together (their scales have ``heads * head_dim`` entries).
``proj_out``'s outputs are ordered ``(p_t, p_h, p_w, out_channels)``. The per-block modulation
``scale_shift_table`` (6, D) is ordered ``shift, scale, gate`` (self-attention) then the same for the
FFN; the output's (2, D) is ``shift, scale``.

Precision: LayerNorm, RMSNorm, RoPE, softmax, the residual additions and the whole timestep path
(sinusoid, ``time_embedder``, ``time_proj``, modulation) are float32 (diffusers keeps the time
embedder and the modulation tables in float32 too); the other matmuls use ``cfg.dtype`` and the
residual stream is carried in ``cfg.dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.wan.config import WanConfig
from vipo_jax.nn.attention import attention
from vipo_jax.nn.lora import Linear
from vipo_jax.nn.stack import make_stack, scan_stack

_F32 = jnp.float32


def _linear(cfg: WanConfig, n_in: int, n_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
            dtype=None) -> Linear:
    """A biased Linear whose kernel carries the logical ``axes`` (in, out) and bias ``(out,)``."""
    return Linear(
        n_in, n_out, use_bias=True, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs,
    )


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x = x.astype(_F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (diffusers ``FP32LayerNorm``: float32 whatever the input)."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm(x, self.eps) * self.scale[...].astype(_F32) + self.bias[...].astype(_F32)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (all heads together) with a learned scale, in float32."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(_F32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(_F32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal ``[cos, sin]`` embedding of (B,) timesteps in float32 (diffusers ``Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0)``). The exponents are float32 as in torch; their exp
    is rounded from float64, which matches torch's float32 exp more often than numpy's or XLA's."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(_F32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(cfg: WanConfig, f: int, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, each (F*H*W, head_dim // 2) float32, token order (f, h, w).

    Channel pairs are split between the frame, height and width axes (``cfg.rope_axes_dims``); the
    per-axis tables are computed in float64 on the host (as diffusers does) and only broadcast here."""
    for n, what in ((f, "latent frames"), (h, "height patches"), (w, "width patches")):
        if n > cfg.rope_max_seq_len:
            raise ValueError(f"{n} {what} exceed rope_max_seq_len={cfg.rope_max_seq_len}")
    tables = []
    for n, d in zip((f, h, w), cfg.rope_axes_dims):
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        tables.append(np.outer(np.arange(n, dtype=np.float64), inv))
    shape = (f, h, w)

    def grid(fn):
        parts = []
        for axis, t in enumerate(tables):
            v = jnp.asarray(fn(t).astype(np.float32))
            v = v.reshape([v.shape[0] if i == axis else 1 for i in range(3)] + [v.shape[1]])
            parts.append(jnp.broadcast_to(v, (*shape, v.shape[-1])))
        return jnp.concatenate(parts, axis=-1).reshape(f * h * w, -1)

    return grid(np.cos), grid(np.sin)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs of ``x`` (B, L, heads, head_dim) in float32; cos / sin are
    (L, head_dim // 2)."""
    x = x.astype(_F32)
    xr = x.reshape(*x.shape[:-1], -1, 2)
    re, im = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape)


class Attention(nnx.Module):
    """diffusers ``WanAttention`` (text-to-video): q, k, v projections, RMSNorm over all heads on
    q and k, optional RoPE (self-attention only), softmax attention, output projection."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.cfg = cfg
        self.to_q = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.to_k = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.to_v = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.to_out = _linear(cfg, d, d, ("heads", "embed"), rngs)
        self.norm_q = RMSNorm(d, cfg.eps, jnp.dtype(cfg.param_dtype))
        self.norm_k = RMSNorm(d, cfg.eps, jnp.dtype(cfg.param_dtype))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope=None) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        context = x if context is None else context
        heads = (cfg.num_attention_heads, cfg.attention_head_dim)
        q = self.norm_q(self.to_q(x)).reshape(*x.shape[:2], *heads)
        k = self.norm_k(self.to_k(context)).reshape(*context.shape[:2], *heads)
        v = self.to_v(context).reshape(*context.shape[:2], *heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=cfg.attention)
        return self.to_out(out.reshape(*x.shape[:2], -1).astype(dtype))


class FeedForward(nnx.Module):
    """dim -> ffn_dim -> GELU(tanh) -> dim (diffusers ``FeedForward(activation_fn="gelu-approximate")``)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.linear_in = _linear(cfg, cfg.inner_dim, cfg.ffn_dim, ("embed", "mlp"), rngs)
        self.linear_out = _linear(cfg, cfg.ffn_dim, cfg.inner_dim, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_out(jax.nn.gelu(self.linear_in(x), approximate=True))


class Block(nnx.Module):
    """diffusers ``WanTransformerBlock``: modulated self-attention with RoPE, cross-attention to the
    text (optionally after an affine LayerNorm, ungated), modulated FFN."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.cfg = cfg
        self.attn1 = Attention(cfg, rngs)
        self.attn2 = Attention(cfg, rngs)
        self.norm2 = LayerNorm(d, cfg.eps, jnp.dtype(cfg.param_dtype)) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(cfg, rngs)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (6, d), jnp.dtype(cfg.param_dtype)) / d**0.5,
            out_sharding=(None, "norm"),
        )

    def __call__(self, x: jax.Array, context: jax.Array, temb6: jax.Array, cos: jax.Array,
                 sin: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        mod = self.scale_shift_table[...].astype(_F32)[None] + temb6  # (B, 6, D) float32
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i, None, :] for i in range(6))
        eps = self.cfg.eps

        h = (_layer_norm(x, eps) * (1.0 + scale) + shift).astype(dtype)
        x = (x.astype(_F32) + self.attn1(h, rope=(cos, sin)).astype(_F32) * gate).astype(dtype)

        h = x if self.norm2 is None else self.norm2(x).astype(dtype)
        x = x + self.attn2(h, context).astype(dtype)

        h = (_layer_norm(x, eps) * (1.0 + c_scale) + c_shift).astype(dtype)
        return (x.astype(_F32) + self.ffn(h).astype(_F32) * c_gate).astype(dtype)


class MLP(nnx.Module):
    """linear_1 -> activation -> linear_2 (diffusers ``TimestepEmbedding`` with SiLU and
    ``PixArtAlphaTextProjection`` with GELU(tanh))."""

    def __init__(self, cfg: WanConfig, n_in: int, act, rngs: nnx.Rngs, dtype=None):
        d = cfg.inner_dim
        self.linear_1 = _linear(cfg, n_in, d, (None, "mlp"), rngs, dtype=dtype)
        self.linear_2 = _linear(cfg, d, d, ("mlp", "embed"), rngs, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class ConditionEmbedder(nnx.Module):
    """diffusers ``WanTimeTextImageEmbedding`` without the image branch. The timestep path (sinusoid,
    ``time_embedder``, SiLU, ``time_proj`` to the 6 x D block modulation) runs in float32."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.time_embedder = MLP(cfg, cfg.freq_dim, jax.nn.silu, rngs, dtype=_F32)
        self.time_proj = _linear(cfg, d, 6 * d, ("embed", "mlp"), rngs, dtype=_F32)
        self.text_embedder = MLP(cfg, cfg.text_dim, _gelu_tanh, rngs)
        self.freq_dim = cfg.freq_dim

    def __call__(self, timestep: jax.Array, text: jax.Array):
        temb = self.time_embedder(timestep_embedding(timestep, self.freq_dim))
        temb6 = self.time_proj(jax.nn.silu(temb)).reshape(temb.shape[0], 6, -1)
        return temb, temb6, self.text_embedder(text)


class WanTransformer(nnx.Module):
    """Wan2.1 T2V DiT (1.3B / 14B): ``model(latents, timestep, text_states, text_mask=None)``.

    See the module docstring for the layouts; batch size is arbitrary (classifier-free guidance
    runs the conditional and unconditional halves in one batch)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.inner_dim
        self.patch_embedding = nnx.Conv(
            cfg.in_channels, d, kernel_size=cfg.patch_size, strides=cfg.patch_size, padding="VALID",
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                              (None, None, None, "conv_in", "conv_out")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs,
        )
        self.condition_embedder = ConditionEmbedder(cfg, rngs)
        self.blocks = make_stack(lambda r: Block(cfg, r), cfg.num_layers, rngs) if cfg.num_layers else None
        self.proj_out = _linear(cfg, d, cfg.out_dim, ("embed", None), rngs)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (2, d), jnp.dtype(cfg.param_dtype)) / d**0.5,
            out_sharding=(None, "norm"),
        )

    def __call__(self, latents: jax.Array, timestep: jax.Array, text_states: jax.Array,
                 text_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, F, H, W, {cfg.in_channels}) channels-last, got {latents.shape}")
        b, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) must be multiples of patch_size {cfg.patch_size}")
        gf, gh, gw = f // pt, h // ph, w // pw
        timestep = jnp.asarray(timestep, _F32)
        if timestep.ndim > 1:
            raise ValueError(f"timestep must be (B,) or a scalar (Wan2.1: one per sample), got {timestep.shape}")
        timestep = jnp.broadcast_to(timestep, (b,))
        if text_states.ndim != 3 or text_states.shape[0] != b or text_states.shape[-1] != cfg.text_dim:
            raise ValueError(f"text_states must be ({b}, L, {cfg.text_dim}), got {text_states.shape}")
        if text_mask is not None:  # what WanPipeline does to padding: zero vectors, no attention mask
            text_states = jnp.where(jnp.asarray(text_mask)[..., None] > 0, text_states, 0)

        temb, temb6, context = self.condition_embedder(timestep, text_states.astype(dtype))
        x = self.patch_embedding(latents.astype(dtype)).reshape(b, gf * gh * gw, cfg.inner_dim)
        cos, sin = rope_tables(cfg, gf, gh, gw)
        if self.blocks is not None:
            x = scan_stack(self.blocks, x, context, temb6, cos, sin, remat=cfg.remat)

        shift, scale = jnp.split(self.scale_shift_table[...].astype(_F32)[None] + temb[:, None], 2, axis=1)
        x = (_layer_norm(x, cfg.eps) * (1.0 + scale) + shift).astype(dtype)
        out = self.proj_out(x).astype(_F32)
        c = out.shape[-1] // (pt * ph * pw)
        out = out.reshape(b, gf, gh, gw, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, f, h, w, c)
