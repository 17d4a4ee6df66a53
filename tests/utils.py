"""Helpers shared by tests: PyTorch reference imports and the parity tolerance."""

from __future__ import annotations

import sys
import types

import numpy as np


def import_open_clip():
    """open_clip imports torchvision, whose compiled ops do not match the CPU torch wheel we pin;
    its fake-op registrations then fail at import. We only use open_clip's model classes, which
    never call those ops, so skip that one registration module."""
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import open_clip

    return open_clip


def assert_close(ours, ref, rel: float = 1e-4, what: str = "output") -> float:
    """Max abs error must be <= rel * max(1, max|ref|). Returns the error for reporting."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel:.0e} x scale {scale:.3g}"
    return err
