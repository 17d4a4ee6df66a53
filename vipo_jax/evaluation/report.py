"""Human-readable evaluation output: one comparison table (checkpoints × metrics, mean ± std,
the change against the first checkpoint), and image grids with the same prompts and noises in
every row, as Markdown and as a self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from vipo_jax.training.logging import image_grid, save_png


def safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _frames(x: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) as they are; videos (N, F, H, W, 3) by their middle frame."""
    return x[:, x.shape[1] // 2] if x.ndim == 5 else x


def save_grids(out: Path, samples: dict[str, np.ndarray], prompts: list[str], k: int) -> None:
    """``grid_<label>.png`` per checkpoint and ``comparison.png`` (one row per checkpoint)."""
    rows = []
    for label, imgs in samples.items():
        imgs = _frames(imgs)[:k]
        save_png(out / f"grid_{safe_name(label)}.png", image_grid(imgs, cols=len(imgs)), scale=_scale(imgs))
        rows.append(imgs)
    if rows:
        both = np.concatenate(rows)
        save_png(out / "comparison.png", image_grid(both, cols=len(rows[0])), scale=_scale(both))


def _scale(imgs: np.ndarray) -> int:
    return max(1, 128 // max(1, imgs.shape[1]))


def comparison_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table; in-domain metrics first and marked with '*'."""
    metrics = [m for m in results["in_domain"] if m in results["metrics"]]
    metrics += [m for m in results["metrics"] if m not in metrics]
    header = ["checkpoint", "step"] + [f"{m}*" if m in results["in_domain"] else m for m in metrics]
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
    return header, rows


def group_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-group table (mean ± std over each group's checkpoint means);
    no rows when no two checkpoints share a group."""
    groups = results.get("groups") or {}
    header, _ = comparison_rows(results)
    metrics = [h.rstrip("*") for h in header[2:]]
    rows = [[g, str(len(r["members"]))] + [f"{r['metrics'][m]['mean']:.4f} ± {r['metrics'][m]['std']:.4f}"
                                             for m in metrics] for g, r in groups.items()]
    return ["group", "n"] + header[2:], rows


def write_reports(out: Path, results: dict, k: int) -> None:
    header, rows = comparison_rows(results)
    gheader, grows = group_rows(results)
    n_p, seeds = len(results["prompts"]), results["seeds"]
    first = next(iter(results["checkpoints"]), "")
    intro = (f"{n_p} prompts × {len(seeds)} seed(s) {seeds}; deterministic ODE sampling "
             f"({results['sampling']['num_steps']} steps, shift {results['sampling']['shift']}). "
             f"Mean ± std over samples; in brackets the change against '{first}'. "
             "* marks the in-domain (trained) reward.")
    md = ["# Evaluation", "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if grows:
        md += ["", "## Groups", "", "Mean ± std (ddof 1) of the per-checkpoint means over each group's checkpoints.",
               "", "| " + " | ".join(gheader) + " |", "|" + "---|" * len(gheader)]
        md += ["| " + " | ".join(r) + " |" for r in grows]
    md += ["", f"## Samples (first {min(k, n_p)} prompts, seed {seeds[0]}; one row per checkpoint)", "",
           "![comparison](comparison.png)", ""]
    md += [f"{i + 1}. {p}" for i, p in enumerate(results["prompts"][:k])]
    (out / "report.md").write_text("\n".join(md) + "\n")

    img = out / "comparison.png"
    src = ("data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()) if img.exists() else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    gth = "".join(f"<th>{html.escape(h)}</th>" for h in gheader)
    gtrs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in grows)
    gtable = f"<h2>Groups</h2><table><tr>{gth}</tr>{gtrs}</table>" if grows else ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in results["prompts"][:k])
    page = (f"<!doctype html><meta charset='utf-8'><title>vipo_jax evaluation</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}"
            f"table{{border-collapse:collapse}}</style><h1>Evaluation</h1><p>{html.escape(intro)}</p>"
            f"<table><tr>{th}</tr>{trs}</table>{gtable}<h2>Samples</h2><img src='{src}' alt='comparison'>"
            f"<ol>{items}</ol>")
    (out / "report.html").write_text(page)
