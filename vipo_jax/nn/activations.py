"""The activation functions of transformers configs (``hidden_act``), by name, shared by the ports."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
    """``ACTIVATIONS[name]``; ``None`` is the identity (a ResNet layer without activation)."""
    if name is None:
        return lambda x: x
    return ACTIVATIONS[name]
