"""Initializer keyword arguments that attach logical axis names (docs/PORTING.md) to the
parameters of flax's standard layers, with flax's own default initializers (so random
initialisation is unchanged): ``nnx.Linear(d, 4 * d, **linear_init("embed", "mlp"), ...)``."""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_embed_init, default_kernel_init

Name = str | None


def linear_init(n_in: Name, n_out: Name) -> dict[str, Any]:
    """``nnx.Linear`` kernel ``(in, out)`` named ``(n_in, n_out)``; its bias named ``(n_out,)``."""
    return {"kernel_init": nnx.with_partitioning(default_kernel_init, (n_in, n_out)),
            "bias_init": nnx.with_partitioning(default_bias_init, (n_out,))}


def conv_init(ndim: int = 2) -> dict[str, Any]:
    """``nnx.Conv`` kernel ``(*spatial, in, out)``: spatial dims never split, then ``conv_in`` and
    ``conv_out``; its bias ``(conv_out,)``."""
    return {"kernel_init": nnx.with_partitioning(default_kernel_init, (None,) * ndim + ("conv_in", "conv_out")),
            "bias_init": nnx.with_partitioning(default_bias_init, ("conv_out",))}


def embed_init(n_rows: Name = "vocab", n_width: Name = "embed") -> dict[str, Any]:
    """``nnx.Embed`` table ``(rows, width)``."""
    return {"embedding_init": nnx.with_partitioning(default_embed_init, (n_rows, n_width))}


def norm_init() -> dict[str, Any]:
    """``nnx.LayerNorm`` scale and bias, named ``("norm",)``."""
    return {"scale_init": nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
            "bias_init": nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))}
