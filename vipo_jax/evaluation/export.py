"""Merge-and-export: a run's trained policy (its LoRA adapters folded into the base weights, or its
EMA) written as one plain model in the native layout (``weights/native.py``: ``config.json`` +
``model.safetensors``), loadable without the run, its config or any adapter code.

Toy worlds: ``OUT`` becomes a complete toy-assets folder (the exported ``transformer/`` plus copies
of the other toy models), so ``--config.model.path=OUT`` trains or evaluates from the fine-tuned
policy. Real worlds: ``OUT/transformer`` holds the native checkpoint; load it with
:func:`load_exported` (``load_native(OUT/"transformer", "flux", FluxConfig, FluxTransformer)``). It
is not a diffusers folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.evaluation.checkpoints import CheckpointSpec
from vipo_jax.evaluation.run import checkpoint_params
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.training.lora import lora_config
from vipo_jax.training.run_dir import run_config
from vipo_jax.weights.loading import ShardingFn
from vipo_jax.weights.native import load_native, save_native
from vipo_jax.worlds import get_family

#: native ``vipo_kind`` of each family's policy
KINDS = {"flux": "flux", "wan": "wan"}


def load_policy(c: mlc.ConfigDict, sharding: ShardingFn | None = None) -> tuple[nnx.Module, Path | None]:
    """The run's policy as its world loads it (same dtypes, remat, attention), without the other
    models; returns it and, for toy worlds, the assets folder it came from."""
    family = get_family(c.model.family)
    if c.world == "toy":
        toy = family.toy_models(c)
        return toy.policy, toy.root
    root = Path(c.model.path) if c.model.path else None
    if root is None or not root.is_dir():
        raise CheckpointError(f"the run's base model is not at --config.model.path={c.model.path!r}; pass "
                              "--model_path=<the folder the run was trained from>")
    return family.pretrained_models(c, root, sharding)[0], None


def export_policy(workdir: str | Path, out: str | Path, *, step: int | None = None, use_ema: bool = False,
                  model_path: str | None = None) -> dict:
    """Write the run's merged policy to ``out`` (see the module docstring); returns what was written
    (also ``out/export.json``)."""
    workdir, out = Path(workdir), Path(out)
    if not workdir.is_dir():
        raise CheckpointError(f"run workdir {workdir} does not exist")
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"{workdir}: no checkpoints/ folder (is it a vipo_jax run workdir?)")
    c = run_config(workdir)
    if model_path:
        c.model.path = model_path
    policy, toy_root = load_policy(c)
    spec = CheckpointSpec("export", str(workdir), step, ema=use_ema)
    params, got, info = checkpoint_params(spec, policy, nnx.state(policy))
    nnx.update(policy, params)
    lora = lora_config(c)
    info.pop("lora_rank", None)
    info["lora"] = ({"rank": lora.rank, "alpha": lora.alpha, "scale": lora.scale, "targets": list(lora.targets)}
                    if lora.enabled else None)
    kind = KINDS[c.model.family]
    if toy_root is not None:  # a complete toy-assets folder: the other toy models alongside
        for sub in sorted(toy_root.iterdir()):
            if sub.is_dir() and sub.name != "transformer":
                shutil.copytree(sub, out / sub.name, dirs_exist_ok=True)
    save_native(policy, out / "transformer", policy.cfg, kind)
    record = {"workdir": str(workdir.absolute()), "step": got, "family": c.model.family, "world": c.world,
              "kind": kind, "transformer": str((out / "transformer").absolute()), **info}
    (out / "export.json").write_text(json.dumps(record, indent=1))
    return record


def load_exported(out: str | Path, **overrides: Any) -> nnx.Module:
    """The policy written by :func:`export_policy` (``overrides``: runtime config fields such as
    ``dtype``, ``remat``, ``attention``)."""
    folder = Path(out) / "transformer"
    kind = json.loads((folder / "config.json").read_text()).get("vipo_kind") if (folder / "config.json").is_file() \
        else None
    if kind == "flux":
        return load_native(folder, "flux", FluxConfig, FluxTransformer, **overrides)
    if kind == "wan":
        return load_native(folder, "wan", WanConfig, WanTransformer, **overrides)
    raise CheckpointError(f"{folder}: not an exported vipo_jax policy (config.json with vipo_kind flux or wan)")

