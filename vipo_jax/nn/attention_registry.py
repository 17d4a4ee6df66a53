"""The attention kernels by name (``register_attention``) and the portable ones: "xla" (the
reference; materialises float32 logits; GSPMD shards it) and "cudnn" (cuDNN flash attention on GPU).
The scale-out kernels ("splash", "context") register themselves in ``attention_kernels.py``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    _REGISTRY[name] = fn


def available_attention() -> list[str]:
    return sorted(_REGISTRY)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                  bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """The reference: float32 logits and softmax; the fallback of every other kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _cudnn(q, k, v, *, mask=None, bias=None, scale=None):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation="cudnn")


register_attention("xla", xla_attention)
register_attention("cudnn", _cudnn)
