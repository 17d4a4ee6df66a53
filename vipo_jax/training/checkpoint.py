"""Orbax checkpoints of the whole run state: params, optimizer, step, RNG and data position.

Everything needed for an exact resume lives in one step folder; the JSON part (step, data-loader
position, counters) is human readable. Saves are atomic (orbax writes to a temporary folder and
renames it when complete), so a run killed mid-save keeps its previous checkpoint; leftover
temporary folders are removed when the next run opens the folder. A state holding a non-finite
value is never saved, so rotation (``keep``) can only drop older good checkpoints for a newer good one.

Restoring the latest checkpoint (:meth:`RunCheckpointer.restore_latest`) falls back to the newest
intact one when the latest cannot be read (a disk error, a partial copy) and moves the unreadable
ones to ``WORKDIR/checkpoints_corrupt/``; a checkpoint that reads but does not fit the model (the
config changed) is an error, not a fallback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vipo_jax.errors import CheckpointError
from vipo_jax.training.run_dir import writing
from vipo_jax.utils.cli import one_line


@jax.jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of ``tree`` (params, optimizer state, EMA) is finite."""
    return bool(jax.device_get(_finite(tree)))


def _structure(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree))


class _Unreadable(Exception):
    """A checkpoint whose files cannot be read (as opposed to one written for another model)."""


def _save_failure(e: BaseException, folder: Path) -> str:
    """Why a save failed, in words: a full disk says so even when orbax reports only a closed event loop."""
    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain) or \
            "No space left" in " ".join(str(x) for x in chain):
        return "the disk is full (no space left on device): free space or use a --workdir on another disk"
    try:
        usage = shutil.disk_usage(folder)
        if usage.free < max(64 * 2**20, usage.total // 1000):
            return (f"the disk is (nearly) full ({usage.free / 2**20:.0f} MiB free): free space or use a --workdir on "
                    f"another disk ({one_line(e, 160)})")
    except OSError:
        pass
    if any(isinstance(x, OSError) and x.errno in (errno.EROFS, errno.EACCES, errno.EPERM) for x in chain):
        return "the folder is read-only: use a writable --workdir"
    return one_line(e, 200)


class RunCheckpointer:
    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        self.workdir = Path(workdir).absolute()
        self.dir = self.workdir / "checkpoints"
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manager = ocp.CheckpointManager(
                self.dir,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                     cleanup_tmp_directories=True),
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write ``state`` and ``meta`` as step ``step``; refused (CheckpointError, nothing written)
        when the state holds a non-finite value, so a bad state never rotates out a good checkpoint."""
        latest = self.latest_step()
        kept = f"the checkpoints in {self.dir} are kept (latest: step {latest})" if latest is not None \
            else f"no checkpoint was written to {self.dir}"
        if not all_finite(state):
            raise CheckpointError(f"not saving step {step}: the train state holds non-finite values; {kept}")
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # orbax raises many types; a full disk shows as "Event loop is closed"
            raise CheckpointError(f"cannot write checkpoint step {step} to {self.dir}: {_save_failure(e, self.dir)}; "
                                  f"{kept}: re-run the same command to resume from it") from e

    def _restore(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        """Step ``step``; _Unreadable when its files cannot be read, CheckpointError when they can but
        hold another model's state."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            stored = self.manager.item_metadata(step)["state"]
            stored_structure = _structure(stored)
        except Exception as e:  # noqa: BLE001 - missing or garbled metadata: the step is unreadable
            raise _Unreadable(one_line(e, 160)) from e
        if stored_structure != _structure(abstract):
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir} holds a train state of another shape ({len(stored_structure)} "
                f"arrays, this run has {len(jax.tree.leaves(abstract))}; e.g. another model size or LoRA rank): "
                "start a new --workdir, or resume with the config the run was trained with")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax / TensorStore raise many types for damaged files
            raise _Unreadable(one_line(e, 160)) from e
        return out["state"], out["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state and meta of ``step`` (default: the latest), shaped like ``abstract_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        try:
            return self._restore(abstract_state, step)
        except _Unreadable as e:
            raise CheckpointError(f"cannot read checkpoint step {step} in {self.dir}: {e}") from e

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int, list[tuple[int, str]]]:
        """The newest checkpoint that reads: ``(state, meta, step, unreadable)`` where ``unreadable``
        lists the newer steps that did not, ``(step, why)``; those are moved to
        ``WORKDIR/checkpoints_corrupt/<step>`` so that the resumed run can write its own."""
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._restore(abstract_state, step)
            except _Unreadable as e:
                unreadable.append((step, str(e)))
                continue
            if unreadable:
                self._set_aside([s for s, _ in unreadable])
            return state, meta, step, unreadable
        if not unreadable:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        listed = "; ".join(f"step {s}: {why}" for s, why in unreadable)
        raise CheckpointError(f"no checkpoint in {self.dir} can be read ({listed}): start a new --workdir")

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.workdir / "checkpoints_corrupt"
            with writing(aside):
                aside.mkdir(exist_ok=True)
                for s in steps:
                    target, n = aside / str(s), 1
                    while target.exists():  # set aside before: keep both
                        target, n = aside / f"{s}.{n}", n + 1
                    (self.dir / str(s)).rename(target)
        ocp.multihost.sync_global_processes("vipo_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
