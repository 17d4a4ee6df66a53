"""LoRA and EMA between a world and the train loop.

LoRA (``config.lora``): the world's policy gets adapters (:func:`vipo_jax.nn.lora.add_lora`) and is
split into the trainable adapters (``nnx.LoRAParam``) and the base weights (everything else). Only
the adapters are the train state's ``params`` (so the optimizer and the checkpoints hold only
them); the base weights ride in the frozen tree under :data:`BASE_KEY`, sharded by the same rules,
and :func:`policy_params` merges both into the policy's full state for ``velocity_fn``. Gradients
reach only the adapters because only they are differentiated.

EMA (``config.train.ema_decay``): ``state["ema"]`` is a float32 moving average of ``state["params"]``
(the adapters under LoRA); the step updates it (``training.step``), and evaluation / export can use
it instead of the raw weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.nn.lora import LoraConfig, add_lora, merge_lora

#: Where the frozen base weights of a LoRA policy live in the train loop's ``frozen`` tree.
BASE_KEY = "policy_base"

#: ``lora.targets`` when the config leaves it empty: the attention and MLP projections of every block
#: (the layers diffusers' Flux / Wan LoRA recipes adapt). Not the embedders, modulation or output.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    # double blocks: img/txt attention qkv and output, img/txt MLP; single blocks: fused qkv+MLP in, out
    "flux": (r"_attn\.qkv$", r"_attn_out$", r"_mlp\.linear_(in|out)$", r"single_transformer_blocks\.linear[12]$"),
    # self- and cross-attention q, k, v, out; feed-forward in, out
    "wan": (r"attn[12]\.to_(q|k|v|out)$", r"ffn\.linear_(in|out)$"),
}


def lora_config(c: mlc.ConfigDict) -> LoraConfig:
    """``c.lora`` as a :class:`LoraConfig` (empty targets: the family's :data:`DEFAULT_TARGETS`);
    rank 0 (or no ``lora`` section, e.g. an older run's config) is LoRA off."""
    section = c.get("lora") if hasattr(c, "get") else None
    if section is None:
        return LoraConfig()
    raw = {"rank": section.get("rank", 0), "alpha": section.get("alpha", 0.0),
           "targets": section.get("targets", "")}
    targets = raw["targets"]
    if int(raw["rank"]) > 0 and not (targets.strip() if isinstance(targets, str) else targets):
        family = c.model.family
        if family not in DEFAULT_TARGETS:
            raise ConfigError(f"--config.lora.targets is empty and model.family={family!r} has no default: "
                              "name the layers to adapt (regular expressions on their paths)")
        raw["targets"] = ",".join(DEFAULT_TARGETS[family])
    return LoraConfig.from_config(raw)


def ema_decay(c: mlc.ConfigDict) -> float:
    """``c.train.ema_decay`` (0 when absent: EMA off)."""
    return float(c.train.get("ema_decay", 0.0) or 0.0)


def policy_params(trainable: Any, frozen: dict) -> nnx.State:
    """The LoRA policy's full state: the trained adapters merged with the frozen base weights."""
    return nnx.merge_state(trainable, frozen[BASE_KEY])


def adapted_policy(policy: nnx.Module, lora: LoraConfig, seed: int) -> tuple[nnx.Module, list[str]]:
    """A copy of ``policy`` (sharing its weight arrays) with adapters attached; the original is not
    modified. Returns the copy and the adapted layer paths."""
    model = nnx.clone(policy)
    paths = add_lora(model, lora, nnx.Rngs(params=jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)))
    return model, paths


def attach_lora(world: Any, c: mlc.ConfigDict) -> tuple[Any, nnx.State, list[str]]:
    """For a LoRA run: a shallow copy of ``world`` whose policy carries adapters (its
    ``graphdefs["policy"]`` updated, its ``frozen`` tree extended by the base weights under
    :data:`BASE_KEY`), the trainable adapters, and the adapted layer paths. The caller's world is
    left as it was, so it can be reused (tests build one world for many runs)."""
    lora = lora_config(c)
    if not isinstance(getattr(world, "graphdefs", None), dict) or "policy" not in world.graphdefs:
        raise ConfigError(f"LoRA needs a world with graphdefs['policy'] (FluxWorld, WanWorld); "
                          f"{type(world).__name__} has none: set --config.lora.rank=0")
    try:
        model, paths = adapted_policy(world.policy, lora, c.seed)
    except ConfigError as e:  # no layer matches: the message lists real layer paths
        raise ConfigError(f"--config.{e}" if str(e).startswith("lora.") else str(e)) from None
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    new = copy.copy(world)
    new.policy = model
    new.graphdefs = {**world.graphdefs, "policy": graphdef}
    new.frozen = {**world.frozen, BASE_KEY: base}
    return new, adapters, paths


def init_ema(params: Any) -> Any:
    """The EMA's starting value: a float32 copy of ``params`` (its own buffers; the state is donated)."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def update_ema(ema: Any, params: Any, decay: float, applied: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` where ``applied`` (some optimizer update of the
    iteration went through), else unchanged: the EMA only follows accepted updates and stays finite
    when every update was skipped for a non-finite loss or gradient."""
    def one(e, p):
        new = decay * e + (1.0 - decay) * p.astype(e.dtype)
        return jnp.where(applied, new, e)

    return jax.tree.map(one, ema, params)


def as_params_dtype(tree: Any, like: Any) -> Any:
    """``tree`` (e.g. the float32 EMA) cast leafwise to the dtypes of ``like`` (the parameters)."""
    return jax.tree.map(lambda a, p: a.astype(p.dtype), tree, like)


# --- checkpoints of LoRA runs: evaluation and export ------------------------------------------------------
def run_config(workdir: str | Path) -> mlc.ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``, written by the train loop)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: no config.json (is it a vipo_jax run workdir?)")
    return mlc.ConfigDict(json.loads(path.read_text()))


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
