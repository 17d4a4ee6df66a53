"""Human-readable evaluation output: one comparison table (checkpoints × metrics, mean ± std,
the change against the first checkpoint), a table of the groups of checkpoints (e.g. one method's
seeds), and image grids with the same prompts and noises in every row, as Markdown and as a
self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from vipo_jax.utils.media import heat_overlay, image_grid, save_png


def safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _frames(x: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) as they are; videos (N, F, H, W, 3) by their middle frame."""
    return x[:, x.shape[1] // 2] if x.ndim == 5 else x


def save_grids(out: Path, samples: dict[str, np.ndarray], prompts: list[str], k: int,
               maps: dict[str, np.ndarray] | None = None) -> None:
    """``grid_<label>.png`` per checkpoint (with a second row of its PSM maps over the samples,
    when given) and ``comparison.png`` (one row per checkpoint)."""
    rows = []
    maps = maps or {}
    for label, imgs in samples.items():
        shown = imgs[:k]
        grid = _frames(shown)
        if label in maps:
            grid = np.concatenate([grid, _frames(heat_overlay(shown, maps[label][:k]))])
        save_png(out / f"grid_{safe_name(label)}.png", image_grid(grid, cols=len(shown)), scale=_scale(grid))
        rows.append(_frames(shown))
    if rows:
        both = np.concatenate(rows)
        save_png(out / "comparison.png", image_grid(both, cols=len(rows[0])), scale=_scale(both))


def _scale(imgs: np.ndarray) -> int:
    return max(1, 128 // max(1, imgs.shape[1]))


def _metric_columns(results: dict) -> tuple[list[str], list[str]]:
    """The metrics in table order (in-domain first) and their column titles ('*': in-domain)."""
    metrics = [m for m in results["in_domain"] if m in results["metrics"]]
    metrics += [m for m in results["metrics"] if m not in metrics]
    return metrics, [f"{m}*" if m in results["in_domain"] else m for m in metrics]


def comparison_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table; in-domain metrics first and marked with '*'."""
    metrics, titles = _metric_columns(results)
    ckpts = results["checkpoints"]
    ref = next(iter(ckpts.values()))["metrics"] if ckpts else {}
    rows = []
    for i, (label, r) in enumerate(ckpts.items()):
        cells = [label, str(r["step"])]
        for m in metrics:
            s = r["metrics"][m]
            cell = f"{s['mean']:.4f} ± {s['std']:.4f}"
            if i > 0:
                cell += f" ({s['mean'] - ref[m]['mean']:+.4f})"
            cells.append(cell)
        rows.append(cells)
    return ["checkpoint", "step"] + titles, rows


def group_stats(results: dict) -> dict[str, dict]:
    """Per group of two or more checkpoints: its members and, per metric, the mean, sample std
    (ddof 1) and n of the members' mean scores (e.g. one method over seeds)."""
    members: dict[str, list[str]] = {}
    for label, r in results["checkpoints"].items():
        members.setdefault(r.get("group") or label, []).append(label)
    out = {}
    for g, labels in members.items():
        if len(labels) < 2:
            continue
        stats = {}
        for m in results["metrics"]:
            v = np.array([results["checkpoints"][lb]["metrics"][m]["mean"] for lb in labels], np.float64)
            stats[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": len(v)}
        out[g] = {"members": labels, "metrics": stats}
    return out


def group_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-group table (``results["groups"]``, from :func:`group_stats`);
    no rows when no two checkpoints share a group."""
    metrics, titles = _metric_columns(results)
    rows = [[g, str(len(r["members"]))] + [f"{r['metrics'][m]['mean']:.4f} ± {r['metrics'][m]['std']:.4f}"
                                           for m in metrics] for g, r in (results.get("groups") or {}).items()]
    return ["group", "n"] + titles, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def write_reports(out: Path, results: dict, k: int) -> None:
    header, rows = comparison_rows(results)
    gheader, grows = group_rows(results)
    n_p, seeds = len(results["prompts"]), results["seeds"]
    first = next(iter(results["checkpoints"]), "")
    intro = (f"{n_p} prompts × {len(seeds)} seed(s) {seeds}; deterministic ODE sampling "
             f"({results['sampling']['num_steps']} steps, shift {results['sampling']['shift']}). "
             f"Mean ± std over samples; in brackets the change against '{first}'. "
             "* marks the in-domain (trained) reward.")
    gintro = "Mean ± std (ddof 1) of the per-checkpoint means over each group's checkpoints."
    md = ["# Evaluation", "", intro, ""] + _md_table(header, rows)
    if grows:
        md += ["", "## Groups", "", gintro, ""] + _md_table(gheader, grows)
    md += ["", f"## Samples (first {min(k, n_p)} prompts, seed {seeds[0]}; one row per checkpoint)", "",
           "![comparison](comparison.png)", ""]
    md += [f"{i + 1}. {p}" for i, p in enumerate(results["prompts"][:k])]
    (out / "report.md").write_text("\n".join(md) + "\n")

    img = out / "comparison.png"
    src = ("data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()) if img.exists() else ""
    gtable = f"<h2>Groups</h2><p>{html.escape(gintro)}</p>{_html_table(gheader, grows)}" if grows else ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in results["prompts"][:k])
    page = (f"<!doctype html><meta charset='utf-8'><title>vipo_jax evaluation</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}"
            f"table{{border-collapse:collapse}}</style><h1>Evaluation</h1><p>{html.escape(intro)}</p>"
            f"{_html_table(header, rows)}{gtable}<h2>Samples</h2><img src='{src}' alt='comparison'>"
            f"<ol>{items}</ol>")
    (out / "report.html").write_text(page)
