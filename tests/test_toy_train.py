"""End to end in the toy world with the committed checkpoints: the CLI, exact resume, SIGTERM,
the non-finite guard, and the on-policy ratio with the real Flux/VAE/DINOv2/CLIP classes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import flux
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.run import NonFiniteError, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def small_config(iterations: int, **over):
    c = flux.get_config("toy")
    c.train.iterations = iterations
    c.sampling.prompts_per_iter = 1
    c.sampling.group_size = 4
    c.log.eval_every = 0
    c.log.ckpt_every = 2
    c.log.tensorboard = False
    c.log.phase_times = False  # timed once in test_embedded_default_run
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


@pytest.fixture(scope="module")
def world():
    from vipo_jax.worlds import build_world

    return build_world(small_config(1))


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_resume_is_bit_exact(tmp_path, world):
    straight = train(small_config(4), tmp_path / "a", world=world, progress=False)
    train(small_config(2), tmp_path / "b", world=world, progress=False)
    resumed = train(small_config(4), tmp_path / "b", world=world, progress=False)
    assert resumed["iterations"] == 4
    for x, y in zip(_params(straight["state"]), _params(resumed["state"])):
        np.testing.assert_array_equal(x, y)
    recs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["ratio_dev_first_update"] == 0.0 for r in recs)  # on-policy ratio exactly 1
    assert all(r["logp/rollout_gap"] < 1e-3 for r in recs)  # rollout log-probs match training's
    assert (tmp_path / "b" / "reward_curve.png").is_file()


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path, world):
    import dataclasses

    import jax.numpy as jnp

    bad = dataclasses.replace(world, rewards={**world.rewards,  # the trained reward turns NaN
                                              world.main_reward: lambda f, im, b: jnp.full(im.shape[:1], jnp.nan)})
    c = small_config(10, **{"train.max_nonfinite": 2})
    with pytest.raises(NonFiniteError, match="2 consecutive updates"):
        train(c, tmp_path / "nan", world=bad, progress=False)
    ckpt = RunCheckpointer(tmp_path / "nan")
    assert ckpt.latest_step() == 2
    from vipo_jax.training.optim import make_optimizer
    from vipo_jax.training.run import init_state

    fresh = init_state(world.params, make_optimizer(c), c.seed)
    restored, meta = ckpt.restore(fresh)
    for x, y in zip(_params(fresh), _params(restored)):  # no update was applied
        np.testing.assert_array_equal(x, y)


def _cli(workdir, *extra):
    return [sys.executable, "-m", "vipo_jax.train", "--config=configs/flux.py:toy", f"--workdir={workdir}",
            "--config.sampling.prompts_per_iter=1", "--config.sampling.group_size=4", "--no_progress", *extra]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_cli(tmp_path / "run", "--config.train.iterations=500", "--config.log.eval_every=0",
                                 "--config.log.ckpt_every=0"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    step = RunCheckpointer(tmp_path / "run").latest_step()
    assert step is not None and step >= 2


def test_embedded_default_run(tmp_path):
    """The README's first command: `python -m vipo_jax.train --config=configs/flux.py:toy` with its
    defaults. The reward of the last 10% of iterations must be clearly above the first 10%."""
    # at XLA's default optimisation (conftest compiles the suite at -O0), as a user runs it
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    out = subprocess.run(_cli(tmp_path / "toy")[:5] + ["--no_progress"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    s = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert s["reward/subject_redness/last10pct"] > s["reward/subject_redness/first10pct"] + 0.05, s
    # the first and final evaluation (digit accuracy: does the subject survive?), printed at the end
    assert s["eval/first_step"] == 0 and s["eval/final_step"] == 100
    for k in ("subject_redness", "digit_accuracy", "digit_accuracy_eval"):
        assert 0 <= s[f"eval/{k}/first"] <= 1 and 0 <= s[f"eval/{k}/final"] <= 1, k
    line = next(x for x in out.stdout.splitlines() if x.startswith("result: "))
    assert "subject_redness" in line and "digit_accuracy" in line and "first -> last 10%" in line, line
    # every phase timed, with its FLOPs and MFU; the step's MFU per iteration too. Only their presence
    # and sign: times depend on the machine's load (the update is the step minus the other phases)
    for p in ("rollout", "decode", "rewards", "psm", "update"):
        assert s[f"phase/{p}_s"] >= 0 and s[f"phase/{p}_tflop"] > 0 and s[f"phase/{p}_mfu"] >= 0, (p, s)
    assert s["phase/rollout_s"] > 0 and s["phase/step_s"] > 0
    recs = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["throughput/mfu"]) and r["throughput/mfu"] > 0 for r in recs if "loss" in r)
    assert sorted(p.name for p in (tmp_path / "toy" / "samples").glob("*.png"))
