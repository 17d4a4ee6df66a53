"""Orbax checkpoints of the whole run state: params, optimizer, step, RNG and data position.

Everything needed for an exact resume lives in one step folder; the JSON part (step, data-loader
position, counters) is human readable. Saves are atomic (orbax writes to a temporary folder and
renames), so a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from vipo_jax.errors import CheckpointError


class RunCheckpointer:
    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        self.dir = Path(workdir).absolute() / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; name the folder for the user
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.dir}: {e}. If the config "
                "changed since it was written, start a new --workdir."
            ) from e
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
