"""BLIP's text encoder: ``med.py``'s ``BertModel`` (also transformers' ``BlipTextModel``), a
post-LN BERT whose layers, when given image tokens, cross-attend to them after self-attention
(BLIP's ``mode="multimodal"``, which ImageReward uses); without them it is a plain BERT encoder
(``mode="text"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.blip.config import BlipTextConfig
from vipo_jax.models.blip.layers import ACT_FNS, layer_norm, linear, param, partitioned, split_heads
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack

# med.py's get_extended_attention_mask: padded keys get -10000 added to the logits (not -inf).
MASK_BIAS = -10000.0


class BertAttention(nnx.Module):
    """``norm(dense(attention(query(x), key(kv), value(kv))) + x)``: BERT's self-attention
    (``kv = x``) or cross-attention (``kv`` = image tokens, ``kv_width`` wide)."""

    def __init__(self, cfg: BlipTextConfig, kv_width: int, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.implementation = cfg.attention
        self.query = linear(cfg, d, d, ("embed", "heads"), rngs)
        self.key = linear(cfg, kv_width, d, ("embed", "heads"), rngs)
        self.value = linear(cfg, kv_width, d, ("embed", "heads"), rngs)
        self.dense = linear(cfg, d, d, ("heads", "embed"), rngs)
        self.norm = layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array | None) -> jax.Array:
        h = self.num_heads
        kv = kv.astype(x.dtype)
        o = attention(split_heads(self.query(x), h), split_heads(self.key(kv), h), split_heads(self.value(kv), h),
                      bias=bias, implementation=self.implementation)
        return self.norm(self.dense(o.reshape(x.shape)) + x)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BlipTextConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.attention = BertAttention(cfg, cfg.hidden_size, rngs)
        if cfg.add_cross_attention:
            self.crossattention = BertAttention(cfg, cfg.encoder_width, rngs)
        self.intermediate = linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.output = linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)
        self.output_norm = layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None, image: jax.Array | None) -> jax.Array:
        x = self.attention(x, x, bias)
        if image is not None:
            x = self.crossattention(x, image, None)  # every image token is attended to (all-ones mask)
        return self.output_norm(self.output(ACT_FNS[self.act](self.intermediate(x))) + x)


class BlipTextModel(nnx.Module):
    """``__call__(input_ids, attention_mask=None, encoder_hidden_states=None) -> last_hidden_state``
    (batch, length, hidden_size).

    ``attention_mask`` (1 = token, 0 = padding) hides padded keys from self-attention as the
    reference does (a -10000 logit bias); padded positions still get outputs. With
    ``encoder_hidden_states`` (batch, tokens, encoder_width) every layer cross-attends to them."""

    def __init__(self, cfg: BlipTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
        self.position_embeddings = param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"), pdt)
        self.embed_norm = layer_norm(cfg, rngs)
        self.layers = make_stack(lambda r: BertLayer(cfg, r), cfg.num_hidden_layers, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        b, n = input_ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {n} > max_position_embeddings {cfg.max_position_embeddings}")
        if encoder_hidden_states is not None:
            if not cfg.add_cross_attention:
                raise ValueError("this text encoder has no cross-attention (add_cross_attention=False)")
            want = (b, cfg.encoder_width)
            got = (encoder_hidden_states.shape[0], encoder_hidden_states.shape[-1])
            if encoder_hidden_states.ndim != 3 or got != want:
                raise ValueError(f"encoder_hidden_states must be (batch={b}, tokens, {cfg.encoder_width}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
        dtype = jnp.dtype(cfg.dtype)
        x = self.word_embeddings(input_ids).astype(dtype) + self.position_embeddings[...][:n].astype(dtype)[None]
        x = self.embed_norm(x)
        bias = None
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(jnp.float32).reshape(b, 1, 1, n)
            # Full (query, key) extent: cuDNN attention refuses a bias broadcast over queries.
            bias = jnp.broadcast_to((1.0 - keep) * MASK_BIAS, (b, 1, n, n))
        return scan_stack(self.layers, x, bias, encoder_hidden_states, remat=cfg.remat)
