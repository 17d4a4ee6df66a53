"""Parity of our jitted ViPO iteration with the PyTorch one organised like the reference scripts
(benchmarks/vs_pytorch.py) at its smallest size: same log-probs, PSM maps, advantages, loss and
gradients from the same weights and randomness. Timings are the benchmark's business, not the test's."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # two step compiles: about a minute on 2 cores


def test_iteration_matches_pytorch(tmp_path, torch):
    from benchmarks import vs_pytorch

    world = vs_pytorch.build_world("test", tmp_path)
    result = vs_pytorch.run_parity(world, log=lambda s: None)
    failed = [c for c in result.checks if not c.ok]
    assert not failed, "\n" + result.table()
    names = {c.name for c in result.checks if not c.info}
    # the quantities the comparison is about are asserted, not just reported
    for key in ("log-prob", "PSM maps", "group advantages", "loss", "gradients, worst leaf", "gradient global norm"):
        assert any(key in n for n in names), key
