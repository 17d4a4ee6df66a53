"""One attention entry point for every model, so kernels can be swapped by name.

Layout is (batch, length, heads, head_dim) throughout. ``implementation`` selects a registered
kernel (a model config's ``attention`` field, validated against :func:`available_attention`):

* "xla": the portable reference (materialises the float32 logits); GSPMD shards it.
* "cudnn": cuDNN flash attention on GPU.
* "splash": Pallas TPU splash attention, per device under the mesh; falls back to "xla" for short
  sequences, a ``bias`` or a non key-padding mask, and off TPU (``nn/attention_kernels.py``).
* "context": context-parallel attention for sequences split over the mesh's ``context`` axis
  (all-gather of K and V); "xla" without such a mesh (``nn/attention_kernels.py``).

Kernels register themselves with :func:`register_attention` when this module is imported.
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


# The scale-out kernels register "splash" and "context"; imported last since they use the names above.
from vipo_jax.nn import attention_kernels as _attention_kernels  # noqa: E402, F401
