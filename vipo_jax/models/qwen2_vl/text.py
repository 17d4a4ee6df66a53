"""The Qwen2-VL language model (transformers ``Qwen2VLTextModel``, the 4.45 ``Qwen2VLModel``) in Flax
NNX: token embeddings, ``num_hidden_layers`` pre-RMSNorm decoder layers (GQA attention with biased
q / k / v projections and (M-)RoPE, SwiGLU MLP), final RMSNorm. Causal attention; an optional
``attention_mask`` (B, L) also hides padding keys.

Position ids. ``position_ids=None`` gives ``0 .. L-1`` in all three M-RoPE sections, which is plain
1-D RoPE: what transformers' language model does when it is called without position ids (and
what VideoAlign gets, see docs/VIDEOALIGN.md). ``(B, L)`` ids are used for all three sections;
``(3, B, L)`` ids are M-RoPE's (temporal, height, width) positions (:func:`mrope_position_ids`
computes them as transformers 4.45's ``get_rope_index`` does for one video). The rotary angles use
section ``i % 3``'s positions for the ``mrope_section[i]`` frequencies of chunk ``i`` of each half
of the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.qwen2_vl.config import Qwen2VLTextConfig
from vipo_jax.models.qwen2_vl.vision import apply_rope
from vipo_jax.nn.annotate import embed_init, linear_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

_TOKENS = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", "length", "act_mlp")


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``, normalised in float32, cast back before the scale."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        return self.weight.get_value().astype(self.dtype) * y


def inv_freq(cfg: Qwen2VLTextConfig) -> np.ndarray:
    """float32 (head_dim / 2,) RoPE frequencies, computed like transformers (in float32)."""
    dim = cfg.head_dim
    return (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))


def rope_cos_sin(cfg: Qwen2VLTextConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(3, B, L) positions -> float32 (cos, sin), each (B, L, head_dim)."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))  # (3, B, L, hd/2)
    chunks, start = [], 0
    for i, size in enumerate(cfg.mrope_section):
        chunks.append(freqs[i % 3, ..., start:start + size])
        start += size
    freqs = jnp.concatenate(chunks, axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def full_position_ids(position_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """None, (B, L) or (3, B, L) position ids -> (3, B, L) int32."""
    if position_ids is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, batch, length))
    position_ids = jnp.asarray(position_ids, jnp.int32)
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    if position_ids.shape != (3, batch, length):
        raise ValueError(f"Qwen2-VL: position_ids must be (B, L) or (3, B, L) for B={batch}, L={length}, "
                         f"got {position_ids.shape}")
    return position_ids


def mrope_position_ids(input_ids: np.ndarray, video_grid_thw: Sequence[int], *, video_token_id: int,
                       spatial_merge_size: int = 2, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """M-RoPE position ids (3, B, L) for rows that each hold one video, as transformers 4.45's
    ``Qwen2VLForConditionalGeneration.get_rope_index``: text tokens count up in all three sections;
    the video's ``t x (h / m) x (w / m)`` tokens get (frame, row, column) offsets from the position
    after the preceding text; the text after the video resumes at one past the largest of them.
    Padding positions (``attention_mask == 0``) get 1. Host-side numpy (computed once per prompt)."""
    ids = np.asarray(input_ids)
    b, length = ids.shape
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    t, h, w = (int(g) for g in video_grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    out = np.ones((3, b, length), np.int64)
    for row in range(b):
        valid = np.nonzero(mask[row])[0]
        tokens = ids[row, valid]
        is_vid = tokens == video_token_id
        n_vid = int(is_vid.sum())
        if n_vid == 0:
            pos = np.broadcast_to(np.arange(len(tokens)), (3, len(tokens)))
        else:
            if n_vid != t * h * w:
                raise ValueError(f"row {row}: {n_vid} video tokens, the grid {video_grid_thw} needs {t * h * w}")
            start = int(np.argmax(is_vid))
            if not is_vid[start:start + n_vid].all():
                raise ValueError(f"row {row}: the video tokens are not contiguous")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            video = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start
            after = video.max() + 1 + np.arange(len(tokens) - start - n_vid)
            pos = np.concatenate([np.broadcast_to(np.arange(start), (3, start)), video,
                                  np.broadcast_to(after, (3, len(after)))], axis=1)
        out[:, row, valid] = pos
    return out


class Qwen2VLAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VLTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)

        def lin(n_in, n_out, names, bias):
            return nnx.Linear(n_in, n_out, use_bias=bias, param_dtype=pd, dtype=dt, rngs=rngs, **linear_init(*names))

        self.q_proj = lin(d, cfg.num_attention_heads * hd, ("embed", "heads"), True)
        self.k_proj = lin(d, cfg.num_key_value_heads * hd, ("embed", "heads"), True)
        self.v_proj = lin(d, cfg.num_key_value_heads * hd, ("embed", "heads"), True)
        self.o_proj = lin(cfg.num_attention_heads * hd, d, ("heads", "embed"), False)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, n, _ = x.shape
        hd, rep = cfg.head_dim, cfg.num_key_value_groups
        q = self.q_proj(x).reshape(b, n, cfg.num_attention_heads, hd)
        k = self.k_proj(x).reshape(b, n, cfg.num_key_value_heads, hd)
        v = self.v_proj(x).reshape(b, n, cfg.num_key_value_heads, hd)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rep > 1:  # GQA: query head i reads key / value head i // rep
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        q, k, v = (constrain(a, _HEADS) for a in (q, k, v))
        o = attention(q, k, v, mask=mask, implementation=cfg.attention)
        return self.o_proj(o.reshape(b, n, cfg.num_attention_heads * hd))


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: Qwen2VLTextConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=False, param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nnx.Linear(d, m, **kw, **linear_init("embed", "mlp"))
        self.up_proj = nnx.Linear(d, m, **kw, **linear_init("embed", "mlp"))
        self.down_proj = nnx.Linear(m, d, **kw, **linear_init("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), _HIDDEN))


class Qwen2VLDecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2VLTextConfig, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=dt)
        self.self_attn = Qwen2VLAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=dt)
        self.mlp = Qwen2MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = constrain(x, _TOKENS)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), _TOKENS)


class Qwen2VLTextModel(nnx.Module):
    """``model(input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None)``
    -> last hidden state (B, L, hidden_size), after the final norm."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, dtype=dt, rngs=rngs,
                                      **embed_init("vocab", "embed"))
        self.layers = make_stack(lambda r: Qwen2VLDecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=dt)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(jnp.asarray(input_ids, jnp.int32))

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2-VL text model: give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        b, n, _ = x.shape
        cos, sin = rope_cos_sin(cfg, full_position_ids(position_ids, b, n))
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = scan_stack(self.layers, constrain(x, _TOKENS), cos, sin, mask, remat=cfg.remat)
        return self.norm(x)
