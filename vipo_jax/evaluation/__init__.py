"""Evaluation of trained policies: ``python -m vipo_jax.evaluate`` (see ``vipo_jax/evaluate.py``)."""

from vipo_jax.evaluation.checkpoints import CheckpointSpec, expand_checkpoint, parse_checkpoint, restore_params
from vipo_jax.evaluation.run import eval_noise, evaluate

__all__ = ["CheckpointSpec", "eval_noise", "evaluate", "expand_checkpoint", "parse_checkpoint", "restore_params"]
