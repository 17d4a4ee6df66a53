"""Expand a sweep file into one training run per grid point, and run, print or submit them.

``python -m launch.sweep --sweep=configs/sweeps/toy_grpo_vs_vipo.py[:arg] --workdir=runs/x
[--dry_run] [--only=NAME,...] [--backend=local|tpu|slurm] [--backend_args="..."]``

A sweep file defines ``get_sweep(arg=None) -> dict`` (``arg`` is what follows the colon):

* ``config``: the base ``--config`` argument of the train CLI, e.g. ``"configs/flux.py:toy"``;
* ``grid``: ``{"config.psm.enabled": [True, False], "config.seed": [0, 1, 2]}``, one Cartesian
  product; or ``grids``: several products, concatenated, as a list or as ``{label: axes}`` (the
  label starts the run names; one-factor-at-a-time sweeps are one labelled grid per factor);
* ``fixed`` (optional): overrides shared by every point, e.g. ``{"config.train.iterations": 50}``;
* ``name`` (optional): a run-name template over the dotted keys and ``{label}``, e.g.
  ``"psm-{psm.enabled}_seed-{seed}"``; by default the label and ``key-value`` of every axis with
  more than one value.

Every key and value is checked against the base config (and the trainer's validation) before
anything starts, so a typo fails at once instead of in the twentieth run. Each point trains in
``WORKDIR/<name>``; ``WORKDIR/sweep.json`` lists the points (name, overrides, command, status).
Locally the points run one after the other, and points whose workdir holds a finished run are
skipped, so re-running the same command resumes a sweep (an interrupted run resumes from its
checkpoint). ``tpu`` runs ``launch/tpu/train.sh`` per point on the slice named in ``--backend_args``;
``slurm`` submits one ``sbatch launch/gpu/slurm.sbatch`` job per point.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import difflib
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections as mlc

BACKENDS = ("local", "tpu", "slurm")
SPEC_KEYS = {"config", "grid", "grids", "fixed", "name", "description"}
_HERE = Path(__file__).resolve().parent

# A runner runs one command, its output appended to ``log`` (None: captured); returns (exit status, stdout).
Runner = Callable[[list[str], Path | None], tuple[int, str]]


class SweepError(ValueError):
    """A sweep file, a key or a value is wrong; the message says which and what would be valid."""


@dataclasses.dataclass
class Point:
    """One run of a sweep: its name, its overrides (dotted keys without ``config.``) and its workdir."""

    name: str
    overrides: dict[str, Any]
    workdir: Path
    config: mlc.ConfigDict | None = None  # base config with the overrides applied
    command: list[str] = dataclasses.field(default_factory=list)
    status: str = "pending"  # pending | done | failed | running | submitted | interrupted
    returncode: int | None = None
    job_id: str | None = None
    seconds: float | None = None

    def record(self) -> dict:
        rec = {"name": self.name, "overrides": {f"config.{k}": v for k, v in self.overrides.items()},
               "workdir": str(self.workdir),
               "command": shlex.join(self.command), "status": self.status}
        for k in ("returncode", "job_id", "seconds"):
            if getattr(self, k) is not None:
                rec[k] = getattr(self, k)
        return rec


# ---------------------------------------------------------------------------------------------- loading


def _load_module(path: str, what: str):
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{what} file {path!r} not found (paths are relative to {os.getcwd()})")
    name = "_vipo_sweep_" + re.sub(r"\W", "_", str(p))
    spec = importlib.util.spec_from_file_location(name, p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # a syntax error or a failing import in the user's file: name it, no traceback
        raise SweepError(f"{what} file {path}: {type(e).__name__}: {_line(e)}") from e
    return mod


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def _call(path: str, fn: Callable, rest: list[str], what: str) -> Any:
    """``fn(*rest)`` (a file's get_config / get_sweep); what it raises, e.g. an unknown ``:arg``, as a SweepError."""
    try:
        return fn(*rest)
    except Exception as e:
        arg = f":{rest[0]}" if rest else ""
        raise SweepError(f"{what} {path}{arg}: {type(e).__name__}: {_line(e)}") from e


def load_config(arg: str) -> mlc.ConfigDict:
    """The base config exactly as the train CLI builds it from ``--config=path[:arg]``."""
    path, *rest = arg.split(":", 1)
    mod = _load_module(path, "config")
    if not hasattr(mod, "get_config"):
        raise SweepError(f"config file {path} has no get_config()")
    return _call(path, mod.get_config, rest, "config file")


def load_sweep(arg: str) -> dict:
    """The dict of ``get_sweep`` from ``path[:arg]``, with its top-level keys checked."""
    path, *rest = arg.split(":", 1)
    mod = _load_module(path, "sweep")
    if not hasattr(mod, "get_sweep"):
        raise SweepError(f"sweep file {path} has no get_sweep(arg=None)")
    spec = _call(path, mod.get_sweep, rest, "sweep file")
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: get_sweep() must return a dict, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown sweep entries {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    if "config" not in spec:
        raise SweepError(f"{path}: the sweep names no base config (\"config\": \"configs/flux.py:toy\")")
    if ("grid" in spec) == ("grids" in spec):
        raise SweepError(f"{path}: give exactly one of \"grid\" (one product) or \"grids\" (several)")
    return spec


# ----------------------------------------------------------------------------------------- key checks


def _strip(key: str) -> str:
    return key[len("config."):] if key.startswith("config.") else key


def _flat_keys(c: mlc.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, mlc.ConfigDict) else [f"{prefix}{k}"]
    return out


def check_key(c: mlc.ConfigDict, key: str, where: str) -> Any:
    """The base value of a dotted key; an unknown key fails with the valid keys next to it."""
    node: Any = c
    parts = _strip(key).split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            if not isinstance(node, mlc.ConfigDict):
                raise SweepError(f"{where}: unknown config key {key!r}: {here} is a value, not a group")
            close = difflib.get_close_matches(_strip(key), _flat_keys(c), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join('config.' + k for k in close)}?" if close else ""
            raise SweepError(f"{where}: unknown config key {key!r}.{hint} Keys in "
                             f"{'config.' + here if here else 'config'}: {', '.join(sorted(node.keys()))}")
        node = node[part]
    if isinstance(node, mlc.ConfigDict):
        raise SweepError(f"{where}: {key!r} is a group, not a value; its keys: {', '.join(sorted(node.keys()))}")
    return node


def _check_type(key: str, value: Any, base: Any, where: str) -> None:
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(type(base), lambda v: True)
    if not ok(value):
        raise SweepError(f"{where}: {key}={value!r} ({type(value).__name__}) does not match the type of the "
                         f"base config's value {base!r} ({type(base).__name__})")


def _set(c: mlc.ConfigDict, key: str, value: Any) -> None:
    *parents, last = _strip(key).split(".")
    for p in parents:
        c = c[p]
    c[last] = float(value) if isinstance(c[last], float) else value


def _validator() -> Callable[[mlc.ConfigDict], None] | None:
    """The trainer's own config validation when vipo_jax imports here (a login node may lack it)."""
    try:
        from vipo_jax.training.checks import check_config as validate
    except ImportError:
        return None
    return validate


# ------------------------------------------------------------------------------------------- expansion


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, float):
        s = f"{v:g}"
    else:
        s = str(v)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "empty"


def cli_value(v: Any) -> str:
    """How the train CLI's ``--config.key=value`` spells a value (full precision for floats)."""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _grids(spec: dict, where: str) -> list[tuple[str | None, dict[str, list]]]:
    raw = spec["grids"] if "grids" in spec else [spec["grid"]]
    items = list(raw.items()) if isinstance(raw, dict) else [(None, g) for g in raw]
    out = []
    for label, axes in items:
        if not isinstance(axes, dict) or not axes:
            raise SweepError(f"{where}: grid {label or ''} must be a non-empty dict of key -> list of values")
        for k, vals in axes.items():
            if not isinstance(vals, list | tuple) or not vals:
                raise SweepError(f"{where}: axis {k!r} needs a non-empty list of values, got {vals!r}")
        out.append((label, {k: list(v) for k, v in axes.items()}))
    return out


def _name(template: str | None, label: str | None, axes: dict[str, list], values: dict[str, Any], where: str) -> str:
    if template:
        def sub(m: re.Match) -> str:
            k = m.group(1)
            if k == "label":
                return label or ""
            if _strip(k) not in values:
                raise SweepError(f"{where}: name template {template!r} uses {{{k}}}, which is not an override "
                                 f"of this point; overrides: {', '.join(values)}")
            return _fmt(values[_strip(k)])
        name = re.sub(r"\{([\w.]+)\}", sub, template)
    else:
        multi = [k for k, v in axes.items() if len(v) > 1] or ([] if label else list(axes))
        parts = ([label] if label else []) + [f"{_strip(k).split('.')[-1]}-{_fmt(values[_strip(k)])}" for k in multi]
        name = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-.") or "base"


def expand(spec: dict, workdir: str | Path, where: str = "sweep") -> list[Point]:
    """All points of a sweep, each with its checked and validated config; no file is touched."""
    base = load_config(spec["config"])
    validate = _validator()
    fixed = {_strip(k): v for k, v in (spec.get("fixed") or {}).items()}
    for k, v in fixed.items():
        _check_type(k, v, check_key(base, k, where), where)
    points: list[Point] = []
    for label, axes in _grids(spec, where):
        for k in axes:
            if _strip(k) in fixed:
                raise SweepError(f"{where}: {k!r} is both fixed and an axis")
            b = check_key(base, k, where)
            for v in axes[k]:
                _check_type(k, v, b, where)
        for combo in itertools.product(*axes.values()):
            values = {_strip(k): v for k, v in zip(axes, combo)}
            name = _name(spec.get("name"), label, axes, values, where)
            overrides = {**fixed, **values}
            c = copy.deepcopy(base)
            for k, v in overrides.items():
                _set(c, k, v)
            if validate is not None:
                try:
                    validate(c)
                except ValueError as e:
                    raise SweepError(f"{where}: point {name} ({overrides}): {e}") from e
            points.append(Point(name, overrides, Path(workdir) / name, c))
    seen: dict[str, dict] = {}
    for p in points:
        if p.name in seen:
            raise SweepError(f"{where}: two points are both named {p.name!r} ({seen[p.name]} and {p.overrides}); "
                             "label the grids or give a \"name\" template that tells them apart")
        seen[p.name] = p.overrides
    return points


def select(points: list[Point], only: str | None) -> list[Point]:
    """The points whose names match one of the comma-separated names or glob patterns of ``--only``."""
    if not only:
        return points
    pats = [s.strip() for s in only.split(",") if s.strip()]
    for pat in pats:
        if not any(fnmatch.fnmatchcase(p.name, pat) for p in points):
            raise SweepError(f"--only: {pat!r} matches no point; points: {', '.join(p.name for p in points)}")
    return [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]


# --------------------------------------------------------------------------------------------- running


def build_command(point: Point, base_config: str, backend: str, backend_args: Sequence[str] = (),
                  python: str = sys.executable) -> list[str]:
    overrides = [f"--config.{k}={cli_value(v)}" for k, v in point.overrides.items()]
    wd = str(point.workdir)
    if backend == "local":
        return [python, "-m", "vipo_jax.train", f"--config={base_config}", f"--workdir={wd}", "--no_progress",
                *overrides]
    if backend == "tpu":
        script = os.path.relpath(_HERE / "tpu" / "train.sh")
        return [script, f"--config={base_config}", f"--workdir={wd}", f"--log-dir={wd}/tpu_logs", *backend_args,
                "--", *overrides]
    if backend == "slurm":
        script = os.path.relpath(_HERE / "gpu" / "slurm.sbatch")
        return ["sbatch", "--parsable", f"--job-name=vipo-{point.name}", f"--output={wd}/slurm-%j.out",
                *backend_args, script, f"--config={base_config}", f"--workdir={wd}", *overrides]
    raise SweepError(f"--backend={backend!r}; use one of {', '.join(BACKENDS)}")


def is_finished(point: Point) -> bool:
    """A finished run wrote summary.json at the end, not stopped early, with all its iterations."""
    f = point.workdir / "summary.json"
    if not f.is_file():
        return False
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    want = point.config.train.iterations if point.config is not None else 0
    return not s.get("stopped_early") and int(s.get("iterations", 0)) >= want


def subprocess_runner(cmd: list[str], log: Path | None) -> tuple[int, str]:
    """Run a command; on Ctrl-C wait for it (the trainer checkpoints on SIGINT) before stopping the sweep."""
    if log is None:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        return p.returncode, p.stdout
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(), ""
        except KeyboardInterrupt:
            print("\ninterrupted: waiting for the run to checkpoint and exit (Ctrl-C again kills it)", flush=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise


def _queued(job_id: str, runner: Runner) -> bool:
    """Whether SLURM still holds a job, so a resumed sweep does not submit it twice."""
    try:
        rc, stdout = runner(["squeue", "-h", "-j", job_id, "-o", "%T"], None)
    except OSError:
        return False
    return rc == 0 and bool(stdout.strip())


def write_manifest(path: Path, meta: dict, points: list[Point]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    tmp.write_text(json.dumps({**meta, "updated": now, "points": [p.record() for p in points]}, indent=1))
    tmp.replace(path)


def _previous(path: Path) -> dict[str, dict]:
    try:
        return {r["name"]: r for r in json.loads(path.read_text()).get("points", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_sweep(sweep_arg: str, workdir: str | Path, *, backend: str = "local", only: str | None = None,
              dry_run: bool = False, backend_args: Sequence[str] = (), runner: Runner = subprocess_runner,
              python: str = sys.executable, out: Callable[[str], None] = print) -> list[Point]:
    """Expand, check, write sweep.json and run/print/submit the selected points; returns all points."""
    if backend not in BACKENDS:
        raise SweepError(f"--backend={backend!r}; use one of {', '.join(BACKENDS)}")
    spec = load_sweep(sweep_arg)
    points = expand(spec, workdir, where=sweep_arg.split(":", 1)[0])
    chosen = {p.name for p in select(points, only)}
    manifest = Path(workdir) / "sweep.json"
    prev = _previous(manifest)
    for p in points:
        p.command = build_command(p, spec["config"], backend, backend_args, python)
        old = prev.get(p.name, {})
        if is_finished(p) or (backend == "tpu" and old.get("status") == "done"):
            p.status = "done"  # the tpu workdirs live on the workers: trust the manifest there
        elif old.get("status") in ("failed", "submitted", "interrupted"):
            p.status, p.job_id = old["status"], old.get("job_id")
    meta = {"sweep": sweep_arg, "config": spec["config"], "backend": backend}
    write_manifest(manifest, meta, points)
    todo = [p for p in points if p.name in chosen]
    out(f"sweep {sweep_arg}: {len(points)} points, {len(todo)} selected, manifest {manifest}")
    failed = 0
    for i, p in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {p.name}"
        if p.status == "done":
            out(f"{tag}: finished already, skipped")
            continue
        if dry_run:
            out(f"{tag}: {shlex.join(p.command)}")
            continue
        if backend == "slurm":
            if p.status == "submitted" and p.job_id and _queued(p.job_id, runner):
                out(f"{tag}: job {p.job_id} is still queued or running, skipped")
                continue
            p.workdir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs the folder
            rc, stdout = runner(p.command, None)
            p.returncode = rc
            if rc == 0:
                p.status, p.job_id = "submitted", stdout.strip().split(";")[0]
                out(f"{tag}: submitted job {p.job_id}")
            else:
                p.status, failed = "failed", failed + 1
                out(f"{tag}: sbatch failed (exit {rc})")
            write_manifest(manifest, meta, points)
            continue
        log = p.workdir / ("train.log" if backend == "local" else "tpu.log")
        out(f"{tag}: running, log {log}")
        p.status = "running"
        write_manifest(manifest, meta, points)
        t0 = time.perf_counter()
        try:
            rc, _ = runner(p.command, log)
        except KeyboardInterrupt:
            p.status = "interrupted"
            write_manifest(manifest, meta, points)
            raise
        p.returncode, p.seconds = rc, round(time.perf_counter() - t0, 1)
        if rc == 0 and (backend == "tpu" or is_finished(p)):
            p.status = "done"
            out(f"{tag}: done in {p.seconds:.0f} s")
        else:
            p.status, failed = "failed", failed + 1
            why = f"exit {rc}" if rc else "exit 0 without a finished run (stopped early?)"
            out(f"{tag}: failed ({why}) after {p.seconds:.0f} s; see {log}")
        write_manifest(manifest, meta, points)
    if failed:
        out(f"{failed} point(s) failed; re-run the same command to retry them (finished points are skipped)")
    return points


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="configs/sweeps/<name>.py[:arg]")
    ap.add_argument("--workdir", required=True, help="the sweep folder: one sub-folder per point and sweep.json")
    ap.add_argument("--backend", default="local", choices=BACKENDS,
                    help="local: run here one after the other; tpu: launch/tpu/train.sh per point; "
                         "slurm: one sbatch job per point")
    ap.add_argument("--backend_args", default="",
                    help="extra arguments of launch/tpu/train.sh (e.g. \"--name=my-v4\") or sbatch (\"--nodes=4\")")
    ap.add_argument("--only", default=None, help="comma-separated point names or glob patterns")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    try:
        try:
            backend_args = shlex.split(args.backend_args)
        except ValueError as e:
            raise SweepError(f"--backend_args={args.backend_args!r}: {e} (quote it as a shell would)") from e
        if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
            raise SweepError(f"--workdir={args.workdir} is a file, not a folder")
        points = run_sweep(args.sweep, args.workdir, backend=args.backend, only=args.only, dry_run=args.dry_run,
                           backend_args=backend_args)
    except SweepError as e:
        print(f"error: {_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the sweep folder read-only or full
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror or e}; use a writable --workdir with free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    chosen = {p.name for p in select(points, args.only)}
    return 1 if any(p.status == "failed" and p.name in chosen for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
