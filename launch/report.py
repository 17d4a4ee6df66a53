"""Aggregate a finished sweep: one row per group of seeds, mean ± std of each number, and the
reward curves of every group (mean over seeds with a ±1 std band).

    python -m launch.report --workdir=runs/toy_grpo_vs_vipo
    python -m launch.report --workdir=runs/toy_ablations --columns=reward/redness/last10pct,eval/digit_accuracy
    python -m launch.report --workdir=runs/toy_region_rewards --paired=grpo --eval=runs/.../eval/results.json

A group is the set of points whose overrides differ only in ``config.seed``. Per run it reads
``summary.json`` (reward of the first and last 10% of iterations) and ``metrics.jsonl`` (the last
evaluation: ``eval/*`` of the final weights on the fixed evaluation prompts). Writes
``report.md`` (the table, with the command of each group), ``report.json`` and ``curves.png`` into
the sweep folder, and prints the table.

``--eval=results.json`` (from ``python -m vipo_jax.evaluate`` over the sweep's runs) adds each run's
held-out scores as ``heldout/<metric>`` columns. ``--paired=BASE`` adds a second table: for every
group named ``<prefix>-<method>`` with a group ``<prefix>-BASE``, the per-seed differences
(method − BASE, runs paired by ``config.seed``: the same prompts and noises), mean ± standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Columns by default: reward gained on the training batches, then the final evaluation.
DEFAULT_COLUMNS = ("{reward}/first10pct", "{reward}/last10pct", "eval/{main}", "eval/digit_accuracy",
                   "eval/color_match", "eval/toy_clip", "eval/redness",
                   # the training batches' metrics, for runs without periodic evaluation
                   "reward/digit_accuracy/last10pct", "reward/toy_clip/last10pct", "reward/redness/last10pct",
                   "map/mean/last10pct")


class ReportError(ValueError):
    """The sweep folder cannot be read: no manifest, or no finished run."""


def _records(workdir: Path) -> list[dict]:
    f = workdir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def run_numbers(workdir: Path) -> dict[str, float]:
    """summary.json's numbers, the first/last 10% of the training batches' ``reward/*`` and
    ``map/mean``, and the last evaluation's ``eval/*`` metrics of one run."""
    out: dict[str, float] = {}
    s = workdir / "summary.json"
    if s.is_file():
        out.update({k: float(v) for k, v in json.loads(s.read_text()).items() if isinstance(v, int | float)})
    records = _records(workdir)
    # First/last 10% of every training metric the trainer logs for the batches (reward/* incl.
    # the unweighted toy metrics, map/mean): what a run without periodic evaluation can report.
    train = [r for r in records if "loss" in r]
    if train:
        k = max(1, len(train) // 10)
        for key in sorted({key for r in train for key in r if key.startswith("reward/") or key == "map/mean"}):
            for part, recs in (("first10pct", train[:k]), ("last10pct", train[-k:])):
                vals = [r[key] for r in recs if r.get(key) is not None]
                if vals and f"{key}/{part}" not in out:
                    out[f"{key}/{part}"] = float(np.mean(vals))
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evals:
        out.update({k: float(v) for k, v in evals[-1].items() if k.startswith("eval/")})
        first = evals[0]
        out.update({f"{k}@0": float(v) for k, v in first.items() if k.startswith("eval/") and first["step"] == 0})
    return out


def heldout_numbers(results_json: str | Path) -> dict[Path, dict[str, float]]:
    """``vipo_jax.evaluate``'s results.json as {run workdir: {"heldout/<metric>": mean}}."""
    results = json.loads(Path(results_json).read_text())
    out: dict[Path, dict[str, float]] = {}
    for entry in results.get("checkpoints", {}).values():
        if entry.get("path"):
            run = Path(str(entry["path"]).split("@")[0]).resolve()
            out[run] = {f"heldout/{k}": float(v["mean"]) for k, v in entry["metrics"].items()}
    return out


def curve(workdir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    recs = [r for r in _records(workdir) if r.get(key) is not None and "loss" in r]
    return np.array([r["step"] for r in recs]), np.array([r[key] for r in recs], np.float64)


def groups(manifest: dict) -> dict[str, list[dict]]:
    """Points grouped by their overrides without the seed, in manifest order; named by the common
    part of their names (the sweep's ``{label}``)."""
    out: dict[str, list[dict]] = {}
    keyname: dict[str, str] = {}
    for p in manifest["points"]:
        key = json.dumps({k: v for k, v in sorted(p["overrides"].items()) if k != "config.seed"})
        name = p["name"].split("_seed-")[0]
        keyname.setdefault(key, name)
        out.setdefault(keyname[key], []).append(p)
    return out


def _mean_std(vals: list[float]) -> tuple[float, float]:
    a = np.asarray(vals, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _trained_reward(workdirs: list[Path]) -> str:
    """The trained reward's key: the first ``reward/*`` of a run's summary.json (which holds only
    the trained rewards), else ``reward``."""
    for w in workdirs:
        s = w / "summary.json"
        if s.is_file():
            keys = sorted(k[: -len("/first10pct")] for k in json.loads(s.read_text())
                          if k.startswith("reward/") and k.endswith("/first10pct"))
            if keys:
                return keys[0]
    return "reward"


def aggregate(workdir: str | Path, columns: Sequence[str] | None = None, reward: str | None = None,
              heldout: str | Path | None = None) -> dict:
    """Per group: the runs used, and mean / std / n of every column. ``reward``: the trained
    reward's name (default: the first ``reward/*`` key a summary has). ``heldout``: an evaluate
    results.json whose scores of the runs become ``heldout/*`` columns."""
    held = heldout_numbers(heldout) if heldout else {}
    workdir = Path(workdir)
    mf = workdir / "sweep.json"
    if not mf.is_file():
        raise ReportError(f"no sweep.json in {workdir}: run `python -m launch.sweep --workdir={workdir} ...` first")
    manifest = json.loads(mf.read_text())
    table: dict[str, Any] = {}
    for name, points in groups(manifest).items():
        runs = {p["name"]: {**run_numbers(Path(p["workdir"])), **held.get(Path(p["workdir"]).resolve(), {}),
                            "seed": p["overrides"].get("config.seed")} for p in points}
        runs = {k: v for k, v in runs.items() if "iterations" in v}
        if not runs:
            continue
        if reward is None:
            reward = _trained_reward([Path(p["workdir"]) for p in points])
        cols = list(columns or [c.format(reward=reward, main=reward.split("/", 1)[-1]) for c in DEFAULT_COLUMNS])
        if columns is None:  # the held-out scores, when given, after the defaults
            cols += sorted({k for v in runs.values() for k in v if k.startswith("heldout/")})
        cols = list(dict.fromkeys(cols))
        stats = {}
        for col in cols:
            vals = [v[col] for v in runs.values() if col in v]
            stats[col] = (*_mean_std(vals), len(vals)) if vals else (float("nan"), 0.0, 0)
        table[name] = {"runs": sorted(runs), "per_run": runs,
                       "overrides": {k: v for k, v in points[0]["overrides"].items() if k != "config.seed"},
                       "workdirs": [p["workdir"] for p in points if p["name"] in runs], "stats": stats}
    if not table:
        raise ReportError(f"no finished run in {workdir} (a finished run has summary.json)")
    if columns is None:  # the defaults: drop the columns no run has
        present = {c for g in table.values() for c, (_, _, n) in g["stats"].items() if n}
        for g in table.values():
            g["stats"] = {c: v for c, v in g["stats"].items() if c in present}
    return {"sweep": manifest.get("sweep"), "config": manifest.get("config"), "reward": reward, "groups": table}


def paired(agg: dict, base: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{group: {column: (mean, standard error, n)}}`` of the per-seed differences group − its
    ``<prefix>-<base>`` group, for every group with such a partner (runs matched by seed)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, g in agg["groups"].items():
        prefix, _, method = name.rpartition("-")
        partner = agg["groups"].get(f"{prefix}-{base}") if prefix else None
        if partner is None or method == base:
            continue
        by_seed = {r["seed"]: r for r in partner["per_run"].values()}
        diffs: dict[str, tuple[float, float, int]] = {}
        for col in g["stats"]:
            d = [r[col] - by_seed[r["seed"]][col] for r in g["per_run"].values()
                 if col in r and r["seed"] in by_seed and col in by_seed[r["seed"]]]
            if d:
                a = np.asarray(d, np.float64)
                se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
                diffs[col] = (float(a.mean()), se, len(a))
        out[name] = diffs
    return out


def paired_markdown(diffs: dict, base: str) -> str:
    if not diffs:
        return f"No group has a `<prefix>-{base}` partner to pair with.\n"
    cols = list(dict.fromkeys(c for d in diffs.values() for c in d))
    lines = [f"Paired differences vs `<prefix>-{base}` (the same seed: prompts and noises), mean ± standard error "
             "over seeds:", "", "| group | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, d in diffs.items():
        n = max((v[2] for v in d.values()), default=0)
        cells = ["–" if c not in d else (f"{d[c][0]:+.4f} ± {d[c][1]:.4f}" if d[c][2] > 1 else f"{d[c][0]:+.4f}")
                 for c in cols]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(agg: dict) -> str:
    cols = list(next(iter(agg["groups"].values()))["stats"])
    lines = [f"Sweep `{agg['sweep']}` on `{agg['config']}`: mean ± std over seeds (n = runs per group).", "",
             "| group | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, g in agg["groups"].items():
        cells = [fmt(m, s, n) for m, s, n in (g["stats"][c] for c in cols)]
        lines.append(f"| {name} | {len(g['runs'])} | " + " | ".join(cells) + " |")
    lines += ["", "Overrides of each group (besides the seed):", ""]
    for name, g in agg["groups"].items():
        ov = " ".join(f"--{k}={v}" for k, v in g["overrides"].items()) or "(the base config)"
        lines.append(f"- {name}: `{ov}`")
    return "\n".join(lines) + "\n"


def plot(agg: dict, workdir: Path, keys: Sequence[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    # one colour per group (tab10 repeats after 10 groups; an ablation sweep has more)
    cmap = plt.get_cmap("tab10" if len(agg["groups"]) <= 10 else "tab20")
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(agg["groups"])}
    drawn = False
    for ax, key in zip(axes[0], keys):
        for name, g in agg["groups"].items():
            curves = [curve(Path(w), key) for w in g["workdirs"]]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            steps = curves[0][0][:n]
            vals = np.stack([c[1][:n] for c in curves])
            win = max(1, n // 10)
            kernel = np.ones(win) / win
            smooth = np.stack([np.convolve(v, kernel, mode="valid") for v in vals])
            m, s = smooth.mean(0), smooth.std(0)
            x = steps[win - 1:]
            ax.plot(x, m, label=f"{name} (n={len(vals)})", color=colours[name])
            ax.fill_between(x, m - s, m + s, alpha=0.2, color=colours[name])
            drawn = True
        ax.set_xlabel("iteration")
        ax.set_title(key)
    legend = {}  # one legend for all panels, beside them
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    if legend:
        fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    path = workdir / "curves.png"
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path if drawn else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the sweep folder (with sweep.json)")
    ap.add_argument("--columns", default="", help="comma-separated numbers to tabulate (default: reward gained, "
                                                  "final eval metrics)")
    ap.add_argument("--curves", default="", help="comma-separated training metrics to plot (default: the reward, "
                                                 "reward/digit_accuracy, map/mean)")
    ap.add_argument("--eval", default="", help="an evaluate results.json over the sweep's runs: adds heldout/* columns")
    ap.add_argument("--paired", default="", help="a method name BASE: per-seed differences of every <prefix>-<method> "
                                                 "group against <prefix>-BASE")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    if args.eval and not Path(args.eval).is_file():
        print(f"error: --eval={args.eval}: no such file (the results.json written by python -m vipo_jax.evaluate)",
              file=sys.stderr)
        return 2
    try:
        agg = aggregate(workdir, [c for c in args.columns.split(",") if c] or None, heldout=args.eval or None)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown(agg)
    if args.paired:
        agg["paired"] = {"base": args.paired, "groups": paired(agg, args.paired)}
        md += "\n" + paired_markdown(agg["paired"]["groups"], args.paired)
    (workdir / "report.md").write_text(md)
    (workdir / "report.json").write_text(json.dumps(agg, indent=1))
    keys = [k for k in args.curves.split(",") if k] or [agg["reward"], "reward/digit_accuracy", "map/mean"]
    png = plot(agg, workdir, keys)
    print(md)
    print(f"written: {workdir / 'report.md'}, report.json" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
