"""Full SDE vs MixGRPO's windowed SDE in the toy world, for ViPO and GRPO: reward per iteration and
per second.

Every run: the embedded default (configs/flux.py:toy: ViPO on subject_redness, lr 2e-5, 8 steps)
for 100 iterations, evaluation at the end. ``full``: the SDE on all 7 trainable steps, 4 of them
trained per sample (timestep_fraction 0.6); ``window2``: the SDE only in a 2-step window that
slides one step per 25 iterations (MixGRPO's schedule), both window transitions trained, the ODE
elsewhere. Seeds 0, 1, 2, paired across cells (the same prompts and initial noises).

Wall-clock: the report's reward curves are per iteration; per second they are the same curves with
each cell's own median iteration time, measured alone on an idle machine (benchmarks/RESULTS.md),
because the sweep's own step times depend on whatever else shares the machine.

COMMAND:
  python -m launch.sweep --sweep=configs/sweeps/toy_windowed.py --workdir=runs/toy_windowed
  python -m launch.report --workdir=runs/toy_windowed --paired=full
Results: docs/EXPERIMENTS.md (e).
"""

from __future__ import annotations

SEEDS = [0, 1, 2]
SAMPLING = {
    "full": {"config.sampling.sde_window": [0]},
    "window2": {"config.sampling.sde_window": [2], "config.sampling.window_schedule": ["sliding"],
                "config.sampling.window_every": [25]},
}
METHODS = {"vipo": {}, "grpo": {"config.psm.enabled": [False]}}


def get_sweep(arg: str | None = None) -> dict:
    arg = (arg or "").strip()
    if arg not in ("", "quick"):
        raise ValueError(f"configs/sweeps/toy_windowed.py: unknown argument {arg!r}; use quick or nothing")
    seeds = SEEDS[:1] if arg == "quick" else SEEDS
    iters = 4 if arg == "quick" else 100
    grids = {f"{m}-{s}": {**METHODS[m], **SAMPLING[s], "config.seed": seeds} for m in METHODS for s in SAMPLING}
    return {
        "config": "configs/flux.py:toy",
        "grids": grids,
        "name": "{label}_seed-{seed}",
        # the toy default docs/EXPERIMENTS.md (e) ran with, pinned against later changes of it
        "fixed": {"config.train.iterations": iters, "config.log.eval_every": iters, "config.log.ckpt_every": iters,
                  "config.rewards.names": "subject_redness", "config.optim.lr": 2e-5, "config.psm.smooth_sigma": 0.5,
                  "config.log.num_eval_prompts": 16},
    }
