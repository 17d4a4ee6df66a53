"""The planner: its argument parsing and device table, and (slow) the full FLUX.1-dev 512x512 train
step compiled for an 8-device simulated mesh with its memory table and FLOP cross-check."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from vipo_jax.errors import ConfigError
from vipo_jax.plan.planner import table
from vipo_jax.utils.devices import DEVICES, device


def test_devices_and_mesh_parsing():
    from vipo_jax.plan.__main__ import parse_mesh

    assert device("H100") is DEVICES["h100"] and DEVICES["v5p"].memory_gib == 95
    with pytest.raises(ConfigError, match="unknown"):
        device("tpu9000")
    assert parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    with pytest.raises(ConfigError, match="axis=size"):
        parse_mesh("fsdp:8")


def test_table_row():
    row = {"model": "FLUX.1-dev 512x512", "mesh": {"data": 1, "fsdp": 8, "context": 1, "tensor": 1},
           "device": "h100", "samples_per_iteration": 96, "params_gib": 5.5, "optimizer_gib": 11.1, "frozen_gib": 0.6,
           "arguments_gib": 17.3, "temporaries_gib": 39.9, "peak_gib": 57.2, "fits": True, "model_tflop": 41285,
           "hardware_tflop": 49542, "predicted_s": 15.7, "mfu": 0.4}
    text = table([row])
    assert "fsdp=8" in text and "57.20 GiB" in text and "15.7 @ 40%" in text


@pytest.mark.slow
def test_plan_flux_dev_512_on_8_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "vipo_jax.plan", "--config=configs/flux.py", "--devices=8",
                        "--mesh=fsdp=8", "--device=h100"], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    print(out)
    row = next(line for line in out.splitlines() if line.startswith("| FLUX.1-dev 512x512"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    params, opt = float(cells[3]), float(cells[4])
    # FLUX.1-dev has 11.9B parameters: float32 master weights split 8 ways, Adam's two moments twice that
    assert 5.0 < params < 6.0 and 1.9 < opt / params < 2.1
    assert cells[9] == "yes"
    m = re.search(r"analytic ([\d.]+) TFLOP vs XLA ([\d.]+) TFLOP", out)
    assert m and abs(float(m.group(1)) / float(m.group(2)) - 1) < 0.10


def test_model_arch_overrides_the_preset_of_an_abstract_world():
    """--config.model.arch (the shallower real-width models of benchmarks/gpu_step.py and the
    planner) replaces FluxConfig fields; a name that is not a field is a ConfigError."""
    from configs.flux import get_config
    from vipo_jax.worlds import build_world

    c = get_config("")
    c.model.arch = "num_layers=2,num_single_layers=4"
    policy = build_world(c, "abstract").policy()
    assert (policy.cfg.num_layers, policy.cfg.num_single_layers, policy.cfg.inner_dim) == (2, 4, 3072)
    c.model.arch = "num_layers=2,depth=3"
    with pytest.raises(ConfigError, match="depth"):
        build_world(c, "abstract")


def test_frozen_phase_flops_from_shapes_alone():
    """The planner counts decode, rewards and PSM from abstract shapes without compiling; the lowered
    count agrees with the compiled one (the per-run phase profile's) on the toy world."""
    import jax

    from configs.flux import get_config
    from vipo_jax.training.step_config import StepConfig
    from vipo_jax.training.throughput import frozen_phase_flops
    from vipo_jax.worlds import build_world

    c = get_config("toy")
    world = build_world(c)
    sc = StepConfig.from_config(c)
    batch = world.train_prompts.shapes(2)
    lowered = frozen_phase_flops(world, sc, batch, compile=False)
    compiled = frozen_phase_flops(world, sc, jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), batch))
    assert set(lowered) == {"decode", "rewards", "psm"} and all(v > 0 for v in lowered.values())
    # the compiled program simplifies elementwise work (16% of the toy rewards' count: tiny models,
    # so elementwise ops are a large share); at full size the matmuls dominate both counts
    for k in lowered:
        assert 0.95 <= lowered[k] / compiled[k] < 1.25, (k, lowered[k], compiled[k])
