"""LoRA fine-tuning settings (``config.lora``) and what evaluation and export do with a LoRA run's
checkpoints.

With ``lora.rank > 0`` the world's policy gets adapters (``World.with_lora``, built on
:func:`vipo_jax.nn.lora.add_lora`): only the adapters (``nnx.LoRAParam``) are the train state's
``params``, so the optimizer and the checkpoints hold only them; the base weights ride in the
frozen tree and ``World.full_params`` merges both for the policy's velocity.
"""

from __future__ import annotations

from typing import Any

import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import ConfigError
from vipo_jax.nn.lora import LoraConfig, merge_lora
from vipo_jax.worlds import get_family
from vipo_jax.worlds.world import adapted_policy


def lora_config(c: mlc.ConfigDict) -> LoraConfig:
    """``c.lora`` as a :class:`LoraConfig` (empty targets: the family's default layers, the attention
    and MLP projections); rank 0 (or no ``lora`` section, e.g. an older run's config) is LoRA off."""
    section = c.get("lora") if hasattr(c, "get") else None
    if section is None:
        return LoraConfig()
    rank, alpha = section.get("rank", 0), section.get("alpha", 0.0)
    targets = section.get("targets", "")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"--config.lora.rank={rank!r} must be an integer >= 0 (0: LoRA off, full fine-tuning)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ConfigError(f"--config.lora.alpha={alpha!r} must be >= 0 (scale alpha / rank; 0: alpha = rank)")
    if not isinstance(targets, str):
        raise ConfigError("--config.lora.targets must be a string of comma-separated regular expressions")
    if rank > 0 and not targets.strip():
        targets = ",".join(get_family(c.model.family).lora_targets)
        if not targets:
            raise ConfigError(f"--config.lora.targets is empty and model.family={c.model.family!r} has no default: "
                              "name the layers to adapt (regular expressions on their paths)")
    try:
        return LoraConfig.from_config({"rank": rank, "alpha": alpha, "targets": targets})
    except ConfigError as e:
        raise ConfigError(f"--config.{e}") from None


def merged_params(policy: nnx.Module, lora: LoraConfig, adapters: Any) -> nnx.State:
    """The full parameter state of ``policy`` with ``adapters`` (a LoRA checkpoint's ``params`` or
    ``ema``) folded into its kernels (:func:`merge_lora`): same tree as ``nnx.state(policy)``, so the
    un-adapted world's ``velocity_fn`` and samplers take it as they are."""
    model, _ = adapted_policy(policy, lora, 0)
    nnx.update(model, adapters)
    merge_lora(model)
    return nnx.state(model)


def initial_adapters(policy: nnx.Module, lora: LoraConfig) -> nnx.State:
    """The adapter tree of ``policy`` under ``lora`` as freshly initialised (the shapes and dtypes a
    LoRA checkpoint's ``params`` / ``ema`` restore into; adapters are small, so concrete is cheap)."""
    model, _ = adapted_policy(policy, lora, 0)
    return nnx.state(model, nnx.LoRAParam)
