"""Accelerators: memory per chip and dense bf16 peak (vendor figures), for the planner's predictions
and the MFU every run reports; ``current_device()`` names the one this process runs on."""

from __future__ import annotations

import dataclasses

import jax

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


#: substrings of ``jax.Device.device_kind`` -> table entry (the first match wins)
_KINDS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("b200", "b200"), ("v6", "v6e"),
          ("v5p", "v5p"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v4", "v4"))


def current_device() -> Device | None:
    """The table entry of ``jax.devices()[0]``, or None (a CPU, or an accelerator not in the table)."""


    d = jax.devices()[0]
    if d.platform == "cpu":
        return None
    kind = str(getattr(d, "device_kind", "")).lower()
    for key, name in _KINDS:
        if key in kind:
            return DEVICES[name]
    return None
