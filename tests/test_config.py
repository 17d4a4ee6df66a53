"""Config files and validation: every bad value is a clear error before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from configs import flux
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.rewards import reward_weights
from vipo_jax.training.checks import check_config as validate


def test_configs_validate():
    for arg in ("toy", "", "dev", "schnell"):
        validate(flux.get_config(arg))
    c = flux.get_config("")
    assert (c.sampling.height, c.sampling.num_steps, c.sampling.shift, c.sampling.eta) == (512, 8, 3.0, 0.3)
    assert (c.sampling.group_size, c.optim.lr, c.sampling.guidance) == (12, 1e-5, 3.5)
    assert (c.psm.num_components, c.psm.sign_rule, c.psm.aggregation) == (3, "border", "weighted")
    with pytest.raises(ValueError, match="unknown argument"):
        flux.get_config("nope")


@pytest.mark.parametrize("key,value,match", [
    ("sampling.group_size", 1, "at least 2 generations"),
    ("sampling.height", 72, "multiples of 16"),
    ("sampling.eta", 0.0, "deterministic"),
    ("train.num_updates", 3, "must divide"),
    ("train.micro_batch", 3, "must divide"),
    ("train.timestep_fraction", 1.5, r"\(0, 1\]"),
    ("train.logprob_reduction", "sum", "position_sum, sample_mean"),
    ("psm.sign_rule", "up", "border, sklearn_u, sklearn_v"),
    ("psm.aggregation", "max", "weighted"),
    ("optim.lr", 0.0, "must be > 0"),
    ("rewards.names", "redness,aesthetics", "unknown reward 'aesthetics'"),
    ("rewards.coefs", "1.0,2.0", "2 values for 1 rewards"),
    ("model.dtype", "float64", "float32, bfloat16"),
])
def test_bad_values_are_clear_errors(key, value, match):
    c = flux.get_config("toy")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_reward_weights_parsing():
    c = flux.get_config("toy")
    c.rewards.names, c.rewards.coefs = "redness, toy_clip", "1.0, 0.5"
    assert reward_weights(c) == (("redness", 1.0), ("toy_clip", 0.5))


def test_real_config_without_weights_says_what_to_download(tmp_path):
    from vipo_jax.worlds import check_world_config

    def check_real_paths(c):
        check_world_config(c, files=True)

    c = flux.get_config("")
    with pytest.raises(CheckpointError, match="black-forest-labs/FLUX.1-dev"):
        check_real_paths(c)
    c.model.path = str(tmp_path)
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError, match="missing vae, text_encoder"):
        check_real_paths(c)
    for d in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (tmp_path / d).mkdir()
    with pytest.raises(CheckpointError, match="dinov2"):
        check_real_paths(c)
    c.psm.enabled = False
    with pytest.raises(DataError, match="prompts"):
        check_real_paths(c)


def test_cli_reports_missing_weights_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vipo_jax.train", "--config=configs/flux.py",
                          f"--workdir={tmp_path}/run", "--no_progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "FLUX.1 weights not found" in out.stderr and "--config.model.path" in out.stderr
