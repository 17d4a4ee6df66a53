"""Accelerators the planner predicts for: memory per chip and dense bf16 peak (vendor figures)."""

from __future__ import annotations

import dataclasses

from vipo_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # usable accelerator memory per chip
    bf16_tflops: float  # dense peak per chip

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", 80, 989),  # H100 SXM
    Device("h200", 141, 989),
    Device("a100", 80, 312),  # A100 80GB SXM
    Device("b200", 180, 2250),
    Device("v4", 32, 275),
    Device("v5e", 16, 197),
    Device("v5p", 95, 459),
    Device("v6e", 32, 918),
)}


def device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ConfigError(f"--device={name!r} unknown; choose one of {sorted(DEVICES)}") from None
