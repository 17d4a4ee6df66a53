"""Every check of a run config, before anything is loaded or written: the world's (family, rewards,
backbone), the step's, the optimizer's, LoRA / EMA, and the loop's own settings. Each error names
the option as it is spelled on the command line and says what would be valid."""

from __future__ import annotations

import ml_collections as mlc

from vipo_jax.errors import ConfigError
from vipo_jax.training.ema import ema_decay
from vipo_jax.training.lora import lora_config
from vipo_jax.training.optim import check_optim
from vipo_jax.training.step_config import StepConfig
from vipo_jax.worlds import check_world_config


def _int(c: mlc.ConfigDict, dotted: str, minimum: int, why: str) -> None:
    section, key = dotted.split(".")
    v = c[section][key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"--config.{dotted}={v!r} must be an integer >= {minimum}{why}")


def check_loop(c: mlc.ConfigDict) -> None:
    """The loop's settings: iterations, the non-finite guard, logging, evaluation, checkpoints."""
    _int(c, "train.iterations", 1, "")
    _int(c, "train.max_nonfinite", 1, " (consecutive skipped updates before the run stops)")
    _int(c, "log.every", 1, "")
    _int(c, "log.eval_every", 0, " (0: no evaluation during training)")
    _int(c, "log.ckpt_every", 0, " (0: a checkpoint at the end and when stopped only)")
    _int(c, "log.keep_checkpoints", 1, " (checkpoints kept on disk; the latest good one is never deleted)")
    _int(c, "log.num_eval_prompts", 1, " (the fixed prompts of the evaluation grids)")


def check_config(c: mlc.ConfigDict, *, files: bool = False) -> StepConfig:
    """All of a run config's checks; returns the step's config. ``files``: also that every weight
    and data file a pretrained world reads is there (the train command checks it before it writes
    anything; a sweep checked on a login node may not see the files)."""
    check_world_config(c, files=files)
    step = StepConfig.from_config(c)
    check_optim(c)
    lora_config(c)
    ema_decay(c)
    check_loop(c)
    return step
