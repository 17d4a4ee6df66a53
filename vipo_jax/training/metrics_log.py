"""The metrics of a run: one JSON line per record in ``metrics.jsonl`` (and TensorBoard)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
        self._f.write(json.dumps({"step": step, **clean}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if np.isfinite(v):
                    self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


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
