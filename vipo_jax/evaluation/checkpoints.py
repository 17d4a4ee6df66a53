"""Which policies an evaluation compares: ``base`` (the world's initial weights) or a run's
workdir (its latest orbax checkpoint, or ``path@STEP``; its raw weights or, with ``ema``, their
moving average), each with a label for the tables. Checkpoints that share a label (repeated, or a
glob such as ``vipo=runs/sweep/vipo_seed-*``) form a group, reported as mean ± std over its members:
the seeds of one method."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.utils.cli import one_line


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    label: str
    path: str | None  # None: the base model
    step: int | None = None
    ema: bool = False  # the run's EMA weights (train.ema_decay > 0) instead of its raw ones
    group: str | None = None  # checkpoints with the same group are summarised together (None: the label)


def parse_checkpoint(arg: str) -> CheckpointSpec:
    """``base``, ``PATH``, ``PATH@STEP`` or ``LABEL=PATH[@STEP]`` (the label defaults to the
    folder's name)."""
    arg = arg.strip()
    if not arg:
        raise ConfigError("empty --checkpoint value")
    label, _, rest = arg.partition("=") if "=" in arg else ("", "", arg)
    if rest == "base":
        return CheckpointSpec(label or "base", None)
    path, step = rest, None
    if "@" in rest:
        path, _, s = rest.rpartition("@")
        if not s.isdigit():
            raise ConfigError(f"--checkpoint={arg!r}: the part after '@' must be a step number")
        step = int(s)
    return CheckpointSpec(label or Path(path).name or path, path, step)


def expand_checkpoint(arg: str) -> list[CheckpointSpec]:
    """:func:`parse_checkpoint`, where a path with glob characters (``*?[``) stands for every
    matching run folder, sorted; they are labelled ``LABEL/<folder>`` and grouped under LABEL
    (default: the pattern's last part)."""
    spec = parse_checkpoint(arg)
    if spec.path is None or not any(ch in spec.path for ch in "*?["):
        return [spec]
    paths = sorted(p for p in glob.glob(spec.path) if Path(p).is_dir())
    if not paths:
        raise ConfigError(f"--checkpoint={arg!r}: no folder matches {spec.path!r}")
    return [dataclasses.replace(spec, label=f"{spec.label}/{Path(p).name}", path=p, group=spec.label)
            for p in paths]


def unique_labels(specs: list[CheckpointSpec]) -> list[CheckpointSpec]:
    """Every label once (repeats get ``#2``, ``#3``...); each spec's group set (the label it was given)."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        n = seen.get(s.label, 0)
        seen[s.label] = n + 1
        out.append(dataclasses.replace(s, label=s.label if n == 0 else f"{s.label}#{n + 1}", group=s.group or s.label))
    return out


def restore_params(spec: CheckpointSpec, abstract_params: Any, key: str = "params") -> tuple[Any, int]:
    """Only the trained parameters of a run's checkpoint (the optimizer state is not read), as
    arrays shaped like ``abstract_params``; returns them and the step they come from. ``key``:
    ``"params"`` or ``"ema"`` (the state entry read; under LoRA both hold the adapters only)."""
    import orbax.checkpoint as ocp

    folder = Path(spec.path) / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(f"{spec.path}: no checkpoints/ folder (is it a vipo_jax run workdir?)")
    manager = ocp.CheckpointManager(folder.absolute())
    try:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{folder}: holds no checkpoint")
        step = spec.step if spec.step is not None else max(steps)
        if step not in steps:
            raise CheckpointError(f"{folder}: no checkpoint at step {step} (have {sorted(steps)})")
        item = {key: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)}
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        except Exception as e:  # orbax raises many kinds; name the folder and the likely cause
            hint = " (and with train.ema_decay > 0, for its EMA)" if key == "ema" else ""
            raise CheckpointError(f"cannot read the policy {key} of {folder} step {step}: {one_line(e, 240)}. Was the "
                                  f"run trained with the same --config (model size, LoRA settings){hint}?") from e
    finally:
        manager.close()
    got = out["state"][key]
    # partial_restore hands back the requested placeholders for paths the checkpoint lacks (e.g. LoRA
    # adapters asked of a full fine-tune whose config.json was edited to say LoRA)
    absent = [jax.tree_util.keystr(k) for k, a in jax.tree_util.tree_leaves_with_path(got)
              if isinstance(a, jax.ShapeDtypeStruct)]
    if absent:
        raise CheckpointError(f"the {key} of {folder} step {step} hold no {absent[0]} (and {len(absent) - 1} more "
                              "arrays this model needs): the checkpoint was written by a run with other settings than "
                              f"{Path(spec.path) / 'config.json'} says (LoRA rank, model size): restore the run's "
                              "own config.json")
    mismatch = [f"{jax.tree_util.keystr(k)}: {np.shape(a)} vs {ref.shape}"
                for (k, a), ref in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(abstract_params))
                if np.shape(a) != tuple(ref.shape)]
    if len(jax.tree.leaves(got)) != len(jax.tree.leaves(abstract_params)) or mismatch:
        raise CheckpointError(f"the policy parameters of {folder} step {step} do not fit this model "
                              f"({'; '.join(mismatch[:3]) or 'different tree'}). Was the run trained with the "
                              "same --config (model size, LoRA settings)?")
    params = jax.tree.map(lambda a, ref: np.asarray(a, dtype=ref.dtype), got, abstract_params)
    return params, step
