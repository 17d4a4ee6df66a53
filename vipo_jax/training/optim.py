"""The optimizer of the reference recipe: AdamW after grad-norm clipping, constant learning rate."""

from __future__ import annotations

import math

import ml_collections as mlc
import optax

from vipo_jax.errors import ConfigError


def check_optim(c: mlc.ConfigDict) -> None:
    """Every ``config.optim`` value finite and in range, each message naming its field."""
    o = c.optim
    for name in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"--config.optim.{name}={v!r} must be a finite number")
    if not o.lr > 0:
        raise ConfigError(f"--config.optim.lr={o.lr} must be > 0")
    if o.lr >= 1.0:
        raise ConfigError(f"--config.optim.lr={o.lr} is >= 1: AdamW moves every weight by about lr per update, "
                          "which destroys any pretrained model (the recipes use 1e-5 .. 5e-5)")
    for name in ("b1", "b2"):
        if not 0 <= o[name] < 1:
            raise ConfigError(f"--config.optim.{name}={o[name]} must be in [0, 1)")
    if not o.eps > 0:
        raise ConfigError(f"--config.optim.eps={o.eps} must be > 0")
    if not o.grad_clip > 0:
        raise ConfigError(f"--config.optim.grad_clip={o.grad_clip} must be > 0")
    if o.weight_decay < 0:
        raise ConfigError(f"--config.optim.weight_decay={o.weight_decay} must be >= 0")


def make_optimizer(c: mlc.ConfigDict) -> optax.GradientTransformation:
    check_optim(c)
    o = c.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
