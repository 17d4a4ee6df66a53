"""One attention entry point for every model, so kernels can be swapped by name.

Layout is (batch, length, heads, head_dim) throughout. ``implementation`` selects a registered
kernel; "xla" is the portable reference, "cudnn" uses cuDNN flash attention on GPU. More kernels
(TPU splash, ring/context-parallel) register themselves with :func:`register_attention`.
"""

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


def _xla(q, k, v, *, mask=None, bias=None, scale=None):
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


register_attention("xla", _xla)
register_attention("cudnn", _cudnn)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None,
              implementation: str = "xla") -> jax.Array:
    """Softmax attention. ``mask`` (bool, broadcastable to (B, H, Lq, Lk)) keeps True entries;
    ``bias`` is added to the logits."""
    try:
        fn = _REGISTRY[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; available: {available_attention()}"
        ) from None
    return fn(q, k, v, mask=mask, bias=bias, scale=scale)
