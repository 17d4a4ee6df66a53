"""Building blocks shared by the CLIP text and vision towers: the pre-LN transformer encoder layer
(attention + MLP) stacked and scanned with :mod:`vipo_jax.nn.stack`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.clip.config import CLIPTextConfig, CLIPVisionConfig
from vipo_jax.nn.annotate import linear_init, norm_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

TOKENS = ("batch", "length", "act_embed")  # logical names of the residual stream (B, L, D)
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", "length", "act_mlp")

TowerConfig = CLIPTextConfig | CLIPVisionConfig


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACT_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU / transformers "gelu"
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class LayerNorm(nnx.LayerNorm):
    """LayerNorm computed in float32 whatever the compute dtype; returns ``out_dtype``."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs, **norm_init())
        self.out_dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


def layer_norm(cfg: TowerConfig, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def linear(cfg: TowerConfig, d_in: int, d_out: int, rngs: nnx.Rngs, names: tuple,
           use_bias: bool = True) -> nnx.Linear:
    """``names``: logical axis names of the kernel (in, out), see docs/PORTING.md."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **linear_init(*names))


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.implementation = cfg.attention
        self.q_proj = linear(cfg, d, d, rngs, ("embed", "heads"))
        self.k_proj = linear(cfg, d, d, rngs, ("embed", "heads"))
        self.v_proj = linear(cfg, d, d, rngs, ("embed", "heads"))
        self.out_proj = linear(cfg, d, d, rngs, ("heads", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, d // self.num_heads)
        q = constrain(self.q_proj(x).reshape(shape), _HEADS)
        k = constrain(self.k_proj(x).reshape(shape), _HEADS)
        v = constrain(self.v_proj(x).reshape(shape), _HEADS)
        o = attention(q, k, v, mask=mask, implementation=self.implementation)
        return self.out_proj(o.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs, ("embed", "mlp"))
        self.fc2 = linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(ACT_FNS[self.act](self.fc1(x)), _HIDDEN))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg, rngs)
        self.self_attn = CLIPAttention(cfg, rngs)
        self.layer_norm2 = layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = constrain(x, TOKENS)
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return constrain(x + self.mlp(self.layer_norm2(x)), TOKENS)


def make_layers(cfg: TowerConfig, rngs: nnx.Rngs) -> nnx.Module:
    return make_stack(lambda r: CLIPEncoderLayer(cfg, r), cfg.num_hidden_layers, rngs)


def run_layers(layers: nnx.Module, x: jax.Array, mask: jax.Array | None, cfg: TowerConfig) -> jax.Array:
    return scan_stack(layers, x, mask, remat=cfg.remat)
