"""The malloc arena cap the train loop sets (vipo_jax/utils/malloc.py; measured by benchmarks/soak.py)."""

from __future__ import annotations

import platform
import sys

import pytest

from vipo_jax.utils.malloc import limit_malloc_arenas


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_cap_is_set_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
