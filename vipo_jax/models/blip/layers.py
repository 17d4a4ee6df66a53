"""Small building blocks shared by the BLIP towers, each parameter created with its logical axis
names (docs/PORTING.md)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.blip.config import BlipTextConfig, BlipVisionConfig

TowerConfig = BlipTextConfig | BlipVisionConfig

ACT_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU / transformers "gelu" (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def partitioned(init, names: tuple[str | None, ...]):
    return nnx.with_partitioning(init, names)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm computed in float32 whatever the compute dtype; returns ``out_dtype``."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                         scale_init=partitioned(nnx.initializers.ones, ("norm",)),
                         bias_init=partitioned(nnx.initializers.zeros, ("norm",)), rngs=rngs)
        self.out_dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


def layer_norm(cfg: TowerConfig, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def linear(cfg: TowerConfig, d_in: int, d_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, *,
           dtype=None) -> nnx.Linear:
    """``nnx.Linear`` with bias whose kernel carries ``axes`` (in, out) and bias ``(out,)``."""
    return nnx.Linear(d_in, d_out, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                      kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
                      bias_init=partitioned(nnx.initializers.zeros, (axes[1],)), rngs=rngs)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, scale: float = 0.02):
    """A hand-made parameter (class token, position table) with its axis names."""
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), out_sharding=axes)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    b, n, d = x.shape
    return x.reshape(b, n, num_heads, d // num_heads)
