"""CLIP text encoder (transformers ``CLIPTextModel``; also open_clip's text tower)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.clip.config import CLIPTextConfig
from vipo_jax.models.clip.layers import TOKENS, layer_norm, make_layers, run_layers
from vipo_jax.nn.annotate import embed_init
from vipo_jax.sharding.rules import constrain


def pool_tokens(hidden: jax.Array, input_ids: jax.Array, cfg: CLIPTextConfig) -> jax.Array:
    """Pick one token's state per sequence, as transformers / open_clip do (see
    :data:`vipo_jax.models.clip.config.POOLING`). Every sequence is assumed to hold an EOS token
    (as a tokenizer makes them); without one, "eos" pools position 0 like the reference."""
    rule = cfg.pooling_rule
    if rule == "first":
        return hidden[:, 0]
    if rule == "last":
        return hidden[:, -1]
    if rule == "argmax":
        idx = jnp.argmax(input_ids, axis=-1)  # first maximum, like torch.argmax
    else:
        idx = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nnx.Module):
    """``__call__(input_ids, attention_mask=None) -> (last_hidden_state, pooled_output)``.

    Causal self-attention; ``attention_mask`` (1 = token, 0 = padding) additionally hides padded
    keys like transformers. ``last_hidden_state`` is after ``final_layer_norm``; ``pooled_output``
    is its row at the EOS token (``cfg.pooling``). Sequences may be shorter than
    ``max_position_embeddings``."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                                         param_dtype=pdt, rngs=rngs, **embed_init("vocab", "embed"))
        self.position_embedding = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), pdt),
            out_sharding=(None, "embed"))
        self.layers = make_layers(cfg, rngs)
        self.final_layer_norm = layer_norm(cfg, rngs)

    def __call__(self, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        n = input_ids.shape[1]
        if n > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {n} > max_position_embeddings {cfg.max_position_embeddings}")
        dtype = jnp.dtype(cfg.dtype)
        x = self.token_embedding(input_ids).astype(dtype)
        x = constrain(x + self.position_embedding[...][:n].astype(dtype)[None], TOKENS)
        mask = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        x = run_layers(self.layers, x, mask, cfg)
        x = self.final_layer_norm(x)
        return x, pool_tokens(x, input_ids, cfg)
