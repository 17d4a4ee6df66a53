"""The paper's ablations in the toy world, one factor at a time around the default ViPO run.

Every run: configs/flux.py:toy with the reference of docs/EXPERIMENTS.md (c) — the global redness
reward at lr 5e-5, smoothing sigma 1 (the toy defaults when it ran, ``REFERENCE``) — for 50
iterations (halfway to the all-red image that setting reaches at 100, so differences in how fast
the reward rises and what it costs the digit still show), no periodic evaluation. Seeds 0, 1, 2
for every group; ``:budget`` keeps 3 seeds for the default group and seed 0 for the others (16 runs
instead of 42; 81 minutes on 2 cores while another sweep shared them).

Each group changes one setting from that reference and keeps the rest:
  map_ones        the map is all ones (psm.aggregation=uniform): ViPO's update with GRPO's advantage
  map_on_reward   the map scales the reward instead of the advantage (train.map_target=reward)
  aggregation     principal components averaged instead of variance-weighted
  num_components  1, 2, 4, 5 principal components (default 3)
  smooth_sigma    Gaussian smoothing 0, 0.5, 2 (default 1)
  sign_rule       the sign of each component from sklearn's U or V convention (default border)
  logprob_reduction  per-sample mean log-prob instead of the per-position sum
The "default" group is the shared reference; the GRPO baseline is in toy_grpo_vs_vipo.py.
The report's first/last-10% means are over iterations 1-5 and 46-50.

COMMAND:
  python -m launch.sweep --sweep=configs/sweeps/toy_ablations.py --workdir=runs/toy_ablations
  python -m launch.sweep --sweep=configs/sweeps/toy_ablations.py:budget --workdir=runs/toy_ablations
  python -m launch.sweep --sweep=configs/sweeps/toy_ablations.py --workdir=runs/toy_ablations --only='smooth_sigma-*'
  python -m launch.report --workdir=runs/toy_ablations
  python -m vipo_jax.evaluate --config=configs/flux.py:toy --checkpoint=base \\
      --checkpoint=default='runs/toy_ablations/default_seed-*' \\
      --checkpoint=map_ones=runs/toy_ablations/map_ones_seed-0 ...  # one per group
Results: docs/EXPERIMENTS.md (c).
"""

from __future__ import annotations

SEEDS = [0, 1, 2]
#: The settings every group starts from (the toy defaults when (c) ran; the toy default now trains
#: subject_redness at 2e-5 with sigma 0.5). Smoothing is set per group, as one factor varies it.
REFERENCE = {"config.rewards.names": "redness", "config.rewards.coefs": "1.0", "config.optim.lr": 5e-5}
REFERENCE_SIGMA = 1.0

# key -> the values other than the default, each a group of its own.
FACTORS: dict[str, list] = {
    "config.psm.aggregation": ["average"],
    "config.psm.num_components": [1, 2, 4, 5],
    "config.psm.smooth_sigma": [0.0, 0.5, 2.0],
    "config.psm.sign_rule": ["sklearn_u", "sklearn_v"],
    "config.train.logprob_reduction": ["sample_mean"],
}


def get_sweep(arg: str | None = None) -> dict:
    arg = (arg or "").strip()
    if arg not in ("", "quick", "budget"):
        raise ValueError(f"configs/sweeps/toy_ablations.py: unknown argument {arg!r}; use quick, budget or nothing")
    seeds = SEEDS[:1] if arg in ("quick", "budget") else SEEDS
    grids: dict[str, dict] = {
        "default": {"config.seed": SEEDS[:1] if arg == "quick" else SEEDS},
        "map_ones": {"config.psm.aggregation": ["uniform"], "config.seed": seeds},
        "map_on_reward": {"config.train.map_target": ["reward"], "config.seed": seeds},
    }
    for key, values in FACTORS.items():
        short = key.rsplit(".", 1)[-1]
        for v in values:
            grids[f"{short}-{v:g}" if isinstance(v, float) else f"{short}-{v}"] = {key: [v], "config.seed": seeds}
    for axes in grids.values():
        axes.setdefault("config.psm.smooth_sigma", [REFERENCE_SIGMA])
    return {
        "config": "configs/flux.py:toy",
        "grids": grids,
        "name": "{label}_seed-{seed}",
        "fixed": {**REFERENCE, "config.train.iterations": 10 if arg == "quick" else 50, "config.log.eval_every": 0},
    }
