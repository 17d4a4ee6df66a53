"""Memory soak of the toy training loop: which of evaluation, checkpoints and TensorBoard makes the
process's resident memory grow with the iteration count.

    python benchmarks/soak.py [--iterations 200] [--warmup 60] [--every 10] [--configs off,eval,ckpt,tb,all]

Each configuration runs ``vipo_jax.training.run.train`` on ``configs/flux.py:toy`` in a fresh
child process (so one configuration's allocations cannot hide or cause another's), with exactly
one of the three on (``eval``: ``log.eval_every=E``; ``ckpt``: ``log.ckpt_every=E``; ``tb``:
``log.tensorboard=True``), all three (``all``) or none (``off``); ``E = --every``, far more often
than the defaults (25 / 20) so a per-event leak shows within a few hundred iterations. The
child's RSS (``VmRSS`` from ``/proc/self/status``) is read after every iteration (at the loop's
metrics write) and the least-squares slope of RSS over the iterations after ``--warmup`` is
reported in MB per 100 iterations, with the RSS at the end of the warm-up and at the end.

A smaller batch than the toy default (``--prompts 2 --group 4``) keeps a configuration to a few
minutes on 2 CPU cores; the events whose memory is measured (evaluation of
``log.num_eval_prompts`` prompts, a checkpoint, a TensorBoard record) do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: configuration name -> (eval_every, ckpt_every, tensorboard); ``E`` stands for ``--every``
CONFIGS = {
    "off": (0, 0, False),
    "eval": ("E", 0, False),
    "ckpt": (0, "E", False),
    "tb": (0, 0, True),
    "all": ("E", "E", True),
}


def rss_mb() -> float:
    """This process's resident set size in MB (``VmRSS``; no psutil needed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")


def run_child(args: argparse.Namespace) -> None:
    """One configuration in this process; writes ``{"samples": [[iteration, rss_mb, seconds], ...]}``."""
    from configs import flux
    from vipo_jax.training import run as run_mod
    from vipo_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    ev, ck, tb = (args.every if v == "E" else v for v in CONFIGS[args.child])
    c = flux.get_config("toy")
    c.train.iterations = args.iterations
    c.sampling.prompts_per_iter = args.prompts
    c.sampling.group_size = args.group
    c.log.eval_every, c.log.ckpt_every, c.log.tensorboard = ev, ck, tb
    samples: list[list[float]] = []
    t0 = time.perf_counter()

    class SamplingWriter(run_mod.MetricsWriter):
        """The loop's metrics writer, reading RSS at each training record (one per iteration)."""

        def write(self, step: int, metrics: dict) -> None:
            super().write(step, metrics)
            if "loss" in metrics:
                samples.append([step, rss_mb(), time.perf_counter() - t0])

    run_mod.MetricsWriter = SamplingWriter
    run_mod.train(c, args.workdir, progress=False)
    Path(args.samples).write_text(json.dumps({"config": args.child, "samples": samples}))


#: iterations per window of the RSS-floor fit
WINDOW = 10
#: iterations per entry of the printed floor trajectory (TensorBoard's writer flushes every 120 s and
#: RSS dips then: a longer window holds one dip each and shows whether the level still climbs)
SPAN = 50


def summarise(name: str, samples: list[list[float]], warmup: int) -> dict:
    after = [s for s in samples if s[0] > warmup]
    its = [s[0] for s in after]
    rss = [s[1] for s in after]
    # RSS alternates by tens of MB between iterations (XLA's buffers alive or not at the sample):
    # the minimum of each window of ``WINDOW`` iterations is the floor a leak would lift
    lows = [(its[i], min(rss[i:i + WINDOW])) for i in range(0, len(its) - WINDOW + 1, WINDOW)]
    return {"config": name, "iterations": int(samples[-1][0]) if samples else 0, "rss_warm_mb": rss[0] if rss else None,
            "rss_end_mb": rss[-1] if rss else None, "rss_max_mb": max(rss) if rss else None,
            "slope_mb_per_100it": 100 * slope(its, rss),
            "floor_slope_mb_per_100it": 100 * slope([x for x, _ in lows], [y for _, y in lows]),
            "floors_mb": [min(rss[i:i + SPAN]) for i in range(0, len(rss) - SPAN + 1, SPAN)],
            "seconds": samples[-1][2] if samples else None}


def table(rows: list[dict]) -> str:
    """The Markdown table of :func:`summarise`'s rows."""
    lines = ["| config | RSS after warm-up (MB) | RSS at end (MB) | max (MB) | slope (MB / 100 it) "
             f"| floor slope (MB / 100 it, min of {WINDOW}) | floor of each {SPAN} it (MB) | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floors = " → ".join(f"{f:.0f}" for f in r["floors_mb"])
        lines.append(f"| {r['config']} | {r['rss_warm_mb']:.1f} | {r['rss_end_mb']:.1f} | {r['rss_max_mb']:.1f} | "
                     f"{r['slope_mb_per_100it']:+.2f} | {r['floor_slope_mb_per_100it']:+.2f} | {floors} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=60, help="iterations left out of the slope fit")
    p.add_argument("--every", type=int, default=10, help="eval / checkpoint period of the configurations using them")
    p.add_argument("--prompts", type=int, default=2, help="sampling.prompts_per_iter")
    p.add_argument("--group", type=int, default=4, help="sampling.group_size")
    p.add_argument("--configs", default="off,eval,ckpt,tb,all", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--json", default="", help="also write the table and every sample to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    p.add_argument("--samples", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        sys.exit(f"error: unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="vipo_soak_") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, f"--child={name}", f"--workdir={Path(tmp) / name}", f"--samples={out}",
                   f"--iterations={args.iterations}", f"--every={args.every}", f"--prompts={args.prompts}",
                   f"--group={args.group}"]
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"error: configuration {name} failed:\n{r.stderr[-3000:]}")
            samples = json.loads(out.read_text())["samples"]
            raw[name] = samples
            rows.append(summarise(name, samples, args.warmup))
            print(f"{name}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"toy soak: {args.iterations} iterations, {args.prompts} prompts x {args.group} samples, eval/ckpt every "
          f"{args.every}, slope fitted after iteration {args.warmup}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "samples": raw}, indent=1))


if __name__ == "__main__":
    main()
