"""LoRA adapters on the policy's linear layers: ``y = x W + b + (alpha / r) (x A) B``.

The policy models build their projections with :class:`Linear` (an ``nnx.Linear`` that may carry
an adapter); :func:`add_lora` attaches ``lora_a`` (in, r) and ``lora_b`` (r, out) as
``nnx.LoRAParam`` variables to the layers whose path matches the configured patterns, with the
leading layer axis of scanned stacks, so each scanned block applies its own slice inside the scan
(no full-size merged weight is ever materialised). Train only the adapters by splitting the model
with ``nnx.LoRAParam``; :func:`merge_lora` folds them into the weights for export.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.errors import ConfigError


class Linear(nnx.Linear):
    """``nnx.Linear`` plus an optional low-rank adapter (``lora_a``, ``lora_b``, ``lora_scale``)."""

    lora_a: nnx.LoRAParam | None = None
    lora_b: nnx.LoRAParam | None = None
    lora_scale: float = 1.0

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        if self.lora_a is not None:
            dt = y.dtype
            low = jnp.dot(inputs.astype(dt), self.lora_a[...].astype(dt))
            y = y + (self.lora_scale * jnp.dot(low, self.lora_b[...].astype(dt))).astype(dt)
        return y


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: LoRA off (full fine-tuning)
    alpha: float = 0.0  # 0: alpha = rank (scale 1)
    targets: tuple[str, ...] = ()  # regular expressions searched in the layer path ("a.b.c")

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0, got {self.rank}")
        if self.rank and not self.targets:
            raise ConfigError("lora.targets is empty: name the layers to adapt (regular expressions on their "
                              "paths, e.g. 'attn' or 'to_q|to_k|to_v')")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets: {t!r} is not a regular expression ({e})") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @classmethod
    def from_config(cls, c: Any) -> LoraConfig:
        """From a ConfigDict section (``rank``, ``alpha``, ``targets`` as a comma-separated string
        or a list)."""
        targets = c.get("targets", ()) if hasattr(c, "get") else ()
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(rank=int(c.get("rank", 0)), alpha=float(c.get("alpha", 0.0)), targets=tuple(targets))


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def lora_layers(model: nnx.Module, targets: tuple[str, ...]) -> list[tuple[str, Linear]]:
    """The adaptable layers whose path matches one of ``targets``."""
    pats = [re.compile(t) for t in targets]
    return [(_path(p), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, Linear) and any(pat.search(_path(p)) for pat in pats)]


def add_lora(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> list[str]:
    """Attach adapters in place (A ~ N(0, 1/in), B = 0, so the model's output is unchanged);
    returns the adapted layer paths. Raises if the patterns match no layer."""
    layers = lora_layers(model, cfg.targets)
    if not layers:
        names = sorted({_path(p) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)})
        raise ConfigError(f"lora.targets {list(cfg.targets)} match no adaptable layer; layers are e.g. "
                          f"{names[:8]}" if names else "this model has no LoRA-capable (vipo_jax.nn.Linear) layers")
    for _, lin in layers:
        kernel = lin.kernel
        shape = kernel.shape  # (*stack, in, out)
        names = kernel.get_metadata().get("out_sharding") or (None,) * len(shape)
        a = jax.random.normal(rngs.params(), shape[:-1] + (cfg.rank,), jnp.float32) / jnp.sqrt(shape[-2])
        lin.lora_a = nnx.LoRAParam(a.astype(kernel.dtype), out_sharding=tuple(names[:-1]) + (None,))
        lin.lora_b = nnx.LoRAParam(jnp.zeros(shape[:-2] + (cfg.rank, shape[-1]), kernel.dtype),
                                   out_sharding=tuple(names[:-2]) + (None, names[-1]))
        lin.lora_scale = cfg.scale
    return [p for p, _ in layers]


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its kernel (``W + scale A B``) and drop it; returns how many."""
    n = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Linear) and m.lora_a is not None:
            a, b = m.lora_a[...].astype(jnp.float32), m.lora_b[...].astype(jnp.float32)
            delta = m.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)
            m.kernel[...] = (m.kernel[...].astype(jnp.float32) + delta).astype(m.kernel.dtype)
            m.lora_a = None
            m.lora_b = None
            n += 1
    return n
