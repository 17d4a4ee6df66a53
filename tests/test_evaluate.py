"""The evaluation CLI's library on the toy world: base vs a written checkpoint, every metric in the
results and the reports, fixed noises, and the error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.flux import get_config
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.evaluation import CheckpointSpec, eval_noise, evaluate, parse_checkpoint, restore_params
from vipo_jax.evaluation.checkpoints import expand_checkpoint
from vipo_jax.evaluation.report import group_stats
from vipo_jax.toy.digits import prompt_set
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.optim import make_optimizer
from vipo_jax.training.run import init_state


@pytest.fixture(scope="module")
def toy():
    from vipo_jax.worlds import build_world

    c = get_config("toy")
    c.log.num_eval_prompts = 2
    return c, build_world(c, evaluation=True)


@pytest.fixture(scope="module")
def run_dir(toy, tmp_path_factory):
    """A run workdir whose checkpoint holds visibly different policy parameters."""
    c, world = toy
    d = tmp_path_factory.mktemp("run")
    params = world.params
    moved = jax.tree.map(lambda p: p * 0.5, params)
    ck = RunCheckpointer(d)
    ck.save(7, init_state(moved, make_optimizer(c), 0), {"iteration": 7})
    ck.close()
    return d


def test_parse_checkpoint():
    assert parse_checkpoint("base") == CheckpointSpec("base", None)
    assert parse_checkpoint("runs/toy_vipo") == CheckpointSpec("toy_vipo", "runs/toy_vipo")
    assert parse_checkpoint("vipo=runs/x@40") == CheckpointSpec("vipo", "runs/x", 40)
    with pytest.raises(ConfigError, match="step number"):
        parse_checkpoint("runs/x@last")


def test_expand_checkpoint_glob_and_groups(tmp_path):
    for name in ("vipo_seed-1", "vipo_seed-0", "grpo_seed-0"):
        (tmp_path / name).mkdir()
    (tmp_path / "vipo_seed-9.log").write_text("")  # files never match
    got = expand_checkpoint(f"vipo={tmp_path}/vipo_seed-*@50")
    assert [(s.label, Path(s.path).name, s.step, s.group) for s in got] == [
        ("vipo/vipo_seed-0", "vipo_seed-0", 50, "vipo"), ("vipo/vipo_seed-1", "vipo_seed-1", 50, "vipo")]
    assert expand_checkpoint("runs/x") == [parse_checkpoint("runs/x")]
    with pytest.raises(ConfigError, match="no folder matches"):
        expand_checkpoint(f"{tmp_path}/nothing_*")
    # a group's std is over the members' means (ddof 1), and singletons are not groups
    def ck(group, mean):
        return {"group": group, "metrics": {"r": {"mean": mean}}}

    res = {"metrics": ["r"], "checkpoints": {"a": ck("g", 1.0), "b": ck("g", 2.0), "c": ck("g", 6.0),
                                             "base": ck("base", 0.0)}}
    g = group_stats(res)
    assert list(g) == ["g"] and g["g"]["members"] == ["a", "b", "c"]
    assert g["g"]["metrics"]["r"] == {"mean": 3.0, "std": float(np.std([1.0, 2.0, 6.0], ddof=1)), "n": 3}


def test_eval_noise_independent_of_batching():
    a = eval_noise(0, 5, (4, 4, 2))
    assert np.array_equal(np.asarray(a[:3]), np.asarray(eval_noise(0, 3, (4, 4, 2))))
    assert not np.allclose(np.asarray(a), np.asarray(eval_noise(1, 5, (4, 4, 2))))


def test_evaluate_base_vs_checkpoint(toy, run_dir, tmp_path):
    c, world = toy
    prompts = prompt_set("eval")[:3]
    res = evaluate(c, [CheckpointSpec("base", None), CheckpointSpec("half", str(run_dir)),
                       CheckpointSpec("base", None)], prompts, [0], tmp_path, batch_size=2, world=world,
                   progress=False)
    metrics = {"redness", "subject_redness", "background_redness", "subject_fraction", "toy_clip", "digit_accuracy",
               "digit_logprob", "digit_accuracy_eval", "color_match"}
    assert set(res["metrics"]) == metrics and res["in_domain"] == ["subject_redness"]
    assert list(res["checkpoints"]) == ["base", "half", "base#2"]
    assert res["checkpoints"]["half"]["step"] == 7
    for r in res["checkpoints"].values():
        assert set(r["metrics"]) == metrics
        assert all(len(v) == 3 for v in r["per_prompt"].values())
    # same noise and weights -> same numbers; other weights -> other images
    base, again = res["checkpoints"]["base"], res["checkpoints"]["base#2"]
    assert base["metrics"] == again["metrics"]
    # the two 'base' entries form a group: mean of their means, std 0; 'half' is alone, no group
    grp = res["groups"]
    assert list(grp) == ["base"] and grp["base"]["members"] == ["base", "base#2"]
    for m in metrics:
        assert grp["base"]["metrics"][m] == {"mean": base["metrics"][m]["mean"], "std": 0.0, "n": 2}
    a, b = np.load(tmp_path / "samples_base.npy"), np.load(tmp_path / "samples_half.npy")
    assert a.shape == (3, 64, 64, 3) and not np.allclose(a, b)
    maps = np.load(tmp_path / "maps_base.npy")  # the PSM maps of the grid's samples (16x16 latent grid)
    assert maps.shape == (3, 16, 16) and maps.min() >= 0.0 and maps.max() <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["prompts"] == prompts
    md = (tmp_path / "report.md").read_text()
    for word in ["redness*", "toy_clip", "digit_accuracy", "color_match", "half", "comparison.png", "## Groups"]:
        assert word in md
    assert "<table>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_restore_errors(toy, run_dir, tmp_path):
    _, world = toy
    params = world.params
    with pytest.raises(CheckpointError, match="no checkpoints/ folder"):
        restore_params(CheckpointSpec("x", str(tmp_path)), params)
    with pytest.raises(CheckpointError, match="no checkpoint at step 3"):
        restore_params(CheckpointSpec("x", str(run_dir), 3), params)
    wrong = jax.tree.map(lambda p: np.zeros(p.shape + (2,), p.dtype), params)
    with pytest.raises(CheckpointError, match="same --config"):
        restore_params(CheckpointSpec("x", str(run_dir)), wrong)


def test_bad_prompts(toy, tmp_path):
    c, world = toy
    with pytest.raises(DataError, match="not a toy-world caption"):
        evaluate(c, [CheckpointSpec("base", None)], ["a photo of a cat"], [0], tmp_path, world=world,
                 progress=False)
    with pytest.raises(DataError, match="no evaluation prompts"):
        evaluate(c, [CheckpointSpec("base", None)], [], [0], tmp_path, world=world, progress=False)


def test_cli_reports_a_missing_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vipo_jax.evaluate", "--config=configs/flux.py:toy",
                        f"--checkpoint={tmp_path / 'nope'}", "--num_prompts=1", f"--out={tmp_path / 'o'}",
                        "--no_progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "no checkpoints/ folder" in r.stderr
