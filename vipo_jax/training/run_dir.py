"""A run's directory: the config it was trained with (``config.json``, written once per run and read
back by evaluation, export and resume), the checks a run passes before it writes anything there, and
the record of resumes under a changed config (``resumes.jsonl``).

A workdir that holds a checkpoint is only resumed by a config that agrees with its ``config.json``
in every key that changes what a trained step computes; :data:`RESUMABLE_KEYS` are the exceptions.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections as mlc

from vipo_jax.errors import CheckpointError, VipoError, WorkdirError
from vipo_jax.utils.cli import os_error_reason, read_json_object

#: Keys that may differ between a workdir's config.json and the config resuming it: how long the run
#: goes (train.iterations, extending a run), when it gives up on non-finite updates, what it logs,
#: evaluates and keeps (log.*), where it runs (mesh.*, sharding.rules), rematerialisation (memory
#: only) and where the prompt caches go. Everything else changes the trained steps.
RESUMABLE_KEYS = ("train.iterations", "train.max_nonfinite", "log.*", "mesh.*", "sharding.rules", "model.remat",
                  "data.cache_dir")
_ABSENT = "<absent>"


def run_config(workdir: str | Path) -> mlc.ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``, written by the train loop)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir}: no config.json (is it a vipo_jax run workdir?)")
    return mlc.ConfigDict(read_json_object(path, "restore it from the run's log or start a new --workdir"))


@contextlib.contextmanager
def writing(what: str | Path) -> Iterator[None]:
    """Turn an OSError while writing ``what`` (read-only, full disk, a file in the way) into a
    one-line WorkdirError naming it."""
    try:
        yield
    except VipoError:
        raise
    except OSError as e:
        raise WorkdirError(f"cannot write {what}: {os_error_reason(e)}") from e


def check_workdir(workdir: str | Path) -> Path:
    """Before anything is built: ``--workdir`` is a folder (or can be made one) this process may
    write, so a bad path fails at once, not after the models load."""
    p = Path(workdir)
    if p.exists() and not p.is_dir():
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder: give a folder path (it is created if "
                           "missing)")
    q = p.absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise WorkdirError(f"--workdir={workdir}: {q} is a file, not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir}: {q} is read-only for this user: give a folder you can write")
    return p


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The finished checkpoint steps in ``WORKDIR/checkpoints`` (orbax's half-written temporary
    folders are not steps)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resumable(key: str) -> bool:
    """Whether ``key`` (dotted) may differ when a run is resumed (:data:`RESUMABLE_KEYS`)."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def config_differences(saved: Mapping, c: mlc.ConfigDict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every key outside :data:`RESUMABLE_KEYS` where the saved
    config (``config.json``'s dict) and ``c`` differ, compared as JSON values."""
    old, new = _flat(saved), _flat(json.loads(c.to_json_best_effort()))
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if not resumable(k) and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def check_resume(workdir: str | Path, c: mlc.ConfigDict, *, resume_anyway: bool = False) -> list[tuple]:
    """The differences between the run in ``workdir`` (when it holds a checkpoint) and ``c``.

    Raises WorkdirError listing them (old -> new) unless ``resume_anyway``: resuming would train
    with values its config.json does not record. A workdir without a checkpoint has no finished
    step to protect: it starts over."""
    workdir = Path(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        return []
    if not (workdir / "config.json").is_file():
        if resume_anyway:
            return [("config.json", _ABSENT, "this config")]
        raise WorkdirError(f"--workdir={workdir} holds checkpoints (latest step {steps[-1]}) but no config.json: "
                           "use a new --workdir, or --resume_anyway to continue it with this config")
    diffs = config_differences(run_config(workdir).to_dict(), c)
    if diffs and not resume_anyway:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs[:12])
        more = f" (and {len(diffs) - 12} more)" if len(diffs) > 12 else ""
        raise WorkdirError(f"--workdir={workdir} holds a run (checkpoint step {steps[-1]}) trained with another "
                           f"config: {listed}{more}. Use a new --workdir, or --resume_anyway to continue it with the "
                           "new values (recorded in resumes.jsonl)")
    return diffs


def write_config(workdir: str | Path, c: mlc.ConfigDict) -> None:
    """``WORKDIR/config.json``, written atomically (a temporary file renamed over it)."""
    path = Path(workdir) / "config.json"
    tmp = path.with_name("config.json.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(c.to_json_best_effort(indent=1))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind


def record_resume(workdir: str | Path, step: int, diffs: list[tuple]) -> None:
    """Append ``{time, step, differing: {key: [old, new]}}`` to ``WORKDIR/resumes.jsonl``: the run's
    config.json is not rewritten, so this says which steps ran with which values."""
    path = Path(workdir) / "resumes.jsonl"
    rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "step": int(step),
           "differing": {k: [old, new] for k, old, new in diffs}}
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
