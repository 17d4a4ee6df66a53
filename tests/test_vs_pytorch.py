"""Parity of our jitted ViPO iteration with the PyTorch one organised like the reference scripts
(pytorch_reference/parity.py, also run by benchmarks/vs_pytorch.py) at its smallest size: our
pretrained world built by ``build_world`` from a tiny FLUX.1 pipeline folder and a DINOv2 folder
written by the reference libraries, against the torch modules that wrote them; same log-probs, PSM
maps, advantages, loss and gradients from the same weights, conditioning and randomness. Timings are
the benchmark's business, not the test's."""

from __future__ import annotations

import pytest

from configs import flux

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # two step compiles: about a minute on 2 cores


def test_iteration_matches_pytorch(tmp_path, torch):
    from pytorch_reference import parity

    pair = parity.build_pair(flux.get_config(""), "test", tmp_path)
    assert pair.world.source == "pretrained"
    result = parity.run_parity(pair, log=lambda s: None)
    failed = [c for c in result.checks if not c.ok]
    assert not failed, "\n" + result.table()
    names = {c.name for c in result.checks if not c.info}
    # the quantities the comparison is about are asserted, not just reported
    for key in ("log-prob", "PSM maps", "group advantages", "loss", "gradients, worst leaf", "gradient global norm"):
        assert any(key in n for n in names), key
