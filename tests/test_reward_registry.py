"""A reward is one registry entry: a throwaway one registered here is trained on, evaluated and
planned with no other change; names, coefficients and sources are checked before anything loads."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import pytest

from configs import flux
from vipo_jax import rewards
from vipo_jax.errors import ConfigError
from vipo_jax.rewards import LoadedReward, RewardEntry


def _blueness(images):
    x = jnp.asarray(images, jnp.float32)
    return jnp.mean(x[..., 2] - 0.5 * (x[..., 0] + x[..., 1]), axis=(-2, -1))


@pytest.fixture()
def blueness():
    rewards.register(RewardEntry("blueness", lambda ctx: LoadedReward(lambda p, im, b: _blueness(im)),
                                 "B - (R+G)/2 (a throwaway test reward)", monitor=True))
    yield "blueness"
    rewards.unregister("blueness")


def test_registered_reward_is_trained_on(blueness, tmp_path):
    from tests.sharding_world import tiny_config  # the synthetic family: compiles in seconds
    from vipo_jax.training.run import train

    c = tiny_config(1)
    c.rewards.names, c.rewards.coefs = "blueness", "1.0"
    train(c, tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(rec["reward/blueness"]) and "reward/redness" not in rec


def test_registered_reward_is_evaluated(blueness, tmp_path):
    from vipo_jax.evaluation import CheckpointSpec, evaluate
    from vipo_jax.worlds import build_world

    c = flux.get_config("toy")
    c.sampling.num_steps = 2
    world = build_world(c, evaluation=True)
    assert "blueness" in world.metrics  # every reward the toy source can load is a metric
    res = evaluate(c, [CheckpointSpec("base", None)], ["a red 3 on a blue background"], [0], tmp_path, world=world,
                   progress=False)
    assert math.isfinite(res["checkpoints"]["base"]["metrics"]["blueness"]["mean"])


def test_registered_reward_is_planned(blueness):
    from tests.sharding_world import tiny_config
    from vipo_jax.plan.planner import plan
    from vipo_jax.utils.devices import device

    c = tiny_config(1)
    c.rewards.names, c.rewards.coefs = "redness,blueness", "1.0,0.5"
    out = plan(c, device("h100"), check_flops=False)
    assert out["rewards"] == ["redness", "blueness"] and out["peak_gib"] > 0


@pytest.mark.parametrize("names,coefs,match", [
    ("redness,redness", "1,1", "names a reward twice"),
    ("redness", "nan", "must be a finite number > 0"),
    ("redness", "-1", "must be a finite number > 0"),
    ("digit_accuracy", "1", "evaluation metric"),
    ("aesthetics", "1", "unknown reward 'aesthetics'"),
])
def test_reward_weights_errors(names, coefs, match):
    c = flux.get_config("toy")
    c.rewards.names, c.rewards.coefs = names, coefs
    with pytest.raises(ConfigError, match=match):
        rewards.reward_weights(c)


def test_rewards_of_another_source_are_refused_before_loading():
    from vipo_jax.worlds import check_world_config

    c = flux.get_config("toy")
    c.rewards.names = "hpsv21"
    with pytest.raises(ConfigError, match="not available in the toy world"):
        check_world_config(c)
    c = flux.get_config("")
    c.rewards.names = "toy_clip"
    with pytest.raises(ConfigError, match="not available in a pretrained"):
        check_world_config(c)
