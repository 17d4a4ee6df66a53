"""T5 v1.1 / UMT5 encoder in Flax NNX (transformers ``T5EncoderModel`` / ``UMT5EncoderModel``).

Pre-norm blocks with an RMS norm without mean or bias, a gated-GELU feed-forward, unscaled
attention with a learned relative position bias (bidirectional log buckets). T5 computes the bias
from layer 0's table once and shares it across layers; UMT5 gives each layer its own table.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.t5.config import T5Config
from vipo_jax.nn.annotate import embed_init, linear_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

_TOKENS = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", "length", "act_mlp")

_ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of ``key - query`` for a (length, length) self-attention, int32.

    Half the buckets are for positive offsets; within each half, offsets below ``num_buckets // 4``
    get their own bucket and larger ones share log-spaced buckets up to ``max_distance``. Computed
    with numpy at trace time (the length is static), in float32 like the reference, so the result
    is a constant of the compiled program.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                     / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(rel < max_exact, 0, log_ratio).astype(np.int64)
    large = np.minimum(large, half - 1)
    out = out + np.where(rel < max_exact, rel, large)
    return out.astype(np.int32)


def bias_from_table(table: jax.Array, buckets: jax.Array) -> jax.Array:
    """(num_buckets, heads) table and (Lq, Lk) buckets -> (1, heads, Lq, Lk) float32 logit bias."""
    values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (Lq, Lk, H)
    return jnp.transpose(values, (2, 0, 1))[None]


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias, computed in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        return (self.weight.get_value().astype(jnp.float32) * y).astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        def lin(i, o, names):
            return nnx.Linear(i, o, use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, **linear_init(*names))

        self.q = lin(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
        self.k = lin(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
        self.v = lin(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
        self.o = lin(cfg.inner_dim, cfg.d_model, ("heads", "embed"))
        if cfg.per_layer_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=pd, dtype=jnp.float32,
                rngs=rngs, **embed_init(None, None))
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.implementation = cfg.attention

    def __call__(self, x: jax.Array, mask: jax.Array | None, bias: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: constrain(t.reshape(b, n, self.heads, self.d_kv), _HEADS)
        out = attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), mask=mask, bias=bias,
                        scale=1.0, implementation=self.implementation)
        return self.o(out.reshape(b, n, self.heads * self.d_kv))


class T5FeedForward(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        def lin(i, o, names):
            return nnx.Linear(i, o, use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, **linear_init(*names))

        if cfg.is_gated:
            self.wi_0 = lin(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
            self.wi_1 = lin(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
        else:
            self.wi = lin(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
        self.wo = lin(cfg.d_ff, cfg.d_model, ("mlp", "embed"))
        self.gated = cfg.is_gated
        self.act = _ACT[cfg.activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(constrain(h, _HIDDEN))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=pd, dtype=dt)
        self.attn = T5Attention(cfg, rngs=rngs)
        self.ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=pd, dtype=dt)
        self.ff = T5FeedForward(cfg, rngs=rngs)
        self.per_layer_bias = cfg.per_layer_bias

    def __call__(self, x: jax.Array, mask: jax.Array | None, bias_or_buckets: jax.Array) -> jax.Array:
        """``bias_or_buckets``: the shared (1, H, L, L) bias (T5), or the (L, L) buckets for this
        layer's own table (UMT5)."""
        if self.per_layer_bias:
            bias = bias_from_table(self.attn.relative_attention_bias.embedding.get_value(), bias_or_buckets)
        else:
            bias = bias_or_buckets
        x = constrain(x, _TOKENS)
        x = x + self.attn(self.attn_norm(x), mask, bias)
        return constrain(x + self.ff(self.ff_norm(x)), _TOKENS)


class T5Encoder(nnx.Module):
    """``__call__(input_ids (B, L), attention_mask (B, L) or None) -> last_hidden_state (B, L, d_model)``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pd, dtype=dt, rngs=rngs,
                                      **embed_init("vocab", "embed"))
        if not cfg.per_layer_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=pd, dtype=jnp.float32,
                rngs=rngs, **embed_init(None, None))
        self.blocks = make_stack(lambda r: T5Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=pd, dtype=dt)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        length = input_ids.shape[1]
        x = constrain(self.embed_tokens(jnp.asarray(input_ids, jnp.int32)), _TOKENS)
        buckets = jnp.asarray(relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
        if cfg.per_layer_bias:
            shared = buckets
        else:
            shared = bias_from_table(self.relative_attention_bias.embedding.get_value(), buckets)
        mask = None
        if attention_mask is not None:
            mask = (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = scan_stack(self.blocks, x, mask, shared, remat=cfg.remat)
        return self.final_layer_norm(x)
