"""A small CNN that reads the digit in a colored-digit image: the toy world's measure of whether
the subject survives RL fine-tuning (GRPO on redness tends to paint it over; ViPO should not)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DigitClassifierConfig:
    channels: tuple[int, ...] = (16, 32, 32)
    hidden: int = 64
    num_classes: int = 10
    image_size: int = 64


class DigitClassifier(nnx.Module):
    def __init__(self, cfg: DigitClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        chans = (3,) + tuple(cfg.channels)
        self.convs = nnx.List([nnx.Conv(chans[i], chans[i + 1], (3, 3), strides=(2, 2), rngs=rngs)
                               for i in range(len(cfg.channels))])
        grid = cfg.image_size // 2 ** len(cfg.channels)
        self.hidden = nnx.Linear(chans[-1] * grid * grid, cfg.hidden, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, cfg.num_classes, rngs=rngs)

    def __call__(self, images01: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [0, 1] -> logits (B, classes). Input is normalised per image so the
        digit is read by contrast, whatever its colors."""
        x = images01.astype(jnp.float32)
        x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-3)
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))
        return self.head(jax.nn.gelu(self.hidden(x.reshape(x.shape[0], -1))))
