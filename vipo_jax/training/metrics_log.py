"""The metrics of a run: one JSON line per record in ``metrics.jsonl`` (and TensorBoard). On resume
the file is cut back to the restored step (:func:`truncate_metrics`), so iterations redone after a
crash between a metrics line and its checkpoint are not written twice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vipo_jax.errors import WorkdirError
from vipo_jax.utils.cli import os_error_reason


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")
        except OSError as e:
            raise WorkdirError(f"cannot write {self.path}: {os_error_reason(e)}") from e
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
        try:
            self._f.write(json.dumps({"step": step, **clean}) + "\n")
            self._f.flush()
        except OSError as e:
            raise WorkdirError(f"cannot write {self.path}: {os_error_reason(e)}") from e
        if self._tb is not None:
            for k, v in metrics.items():
                if np.isfinite(v):
                    self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the records of steps <= ``step`` (none when ``step`` is 0: a run from scratch writes
    them all again) and drop a half-written last line; rewritten atomically. Returns how many lines
    were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if line.endswith("\n") and isinstance(rec, dict) and 0 < step and rec.get("step", step + 1) <= step:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read metrics.jsonl, one merged record per step: the training metrics and the evaluation
    metrics written at the same step are kept together; on resume, a later value of a key replaces
    the earlier one."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[k] for k in sorted(by_step)]
