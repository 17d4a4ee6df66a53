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

import jax

from vipo_jax.nn import attention_kernels as _attention_kernels  # noqa: F401  (registers splash, context)
from vipo_jax.nn.attention_registry import _REGISTRY, available_attention, register_attention, xla_attention

__all__ = ["attention", "available_attention", "register_attention", "xla_attention"]


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
