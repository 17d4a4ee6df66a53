"""The toy world's main comparison: plain GRPO (the DanceGRPO baseline, PSM off) against ViPO, 3 seeds.

At lr 2e-5 (the embedded default's 5e-5 turns every image pure red within 100 iterations for both
methods, which leaves nothing to compare): how much redness each gains, and whether the digit is
still read by the classifier and the colours still follow the prompt (the evaluation every 25
iterations on the fixed evaluation prompts).

COMMAND:
  python -m launch.sweep --sweep=configs/sweeps/toy_grpo_vs_vipo.py --workdir=runs/toy_grpo_vs_vipo
  python -m launch.report --workdir=runs/toy_grpo_vs_vipo
  python -m vipo_jax.evaluate --config=configs/flux.py:toy --checkpoint=base \\
      --checkpoint=grpo='runs/toy_grpo_vs_vipo/grpo_seed-*' --checkpoint=vipo='runs/toy_grpo_vs_vipo/vipo_seed-*' \\
      --out=runs/toy_grpo_vs_vipo/eval
  # smoke test (one seed, 10 iterations, no evaluation):
  python -m launch.sweep --sweep=configs/sweeps/toy_grpo_vs_vipo.py:quick --workdir=runs/quick_grpo_vs_vipo
Results: docs/EXPERIMENTS.md (a).
"""

from __future__ import annotations

SEEDS = [0, 1, 2]


def get_sweep(arg: str | None = None) -> dict:
    arg = (arg or "").strip()
    if arg not in ("", "quick"):
        raise ValueError(f"configs/sweeps/toy_grpo_vs_vipo.py: unknown argument {arg!r}; use quick or nothing")
    seeds = SEEDS[:1] if arg == "quick" else SEEDS
    return {
        "config": "configs/flux.py:toy",
        "grids": {
            "grpo": {"config.psm.enabled": [False], "config.seed": seeds},
            "vipo": {"config.psm.enabled": [True], "config.seed": seeds},
        },
        "name": "{label}_seed-{seed}",
        # the settings of docs/EXPERIMENTS.md (a): the global redness, sigma 1 (the toy defaults then)
        "fixed": {"config.optim.lr": 2e-5, "config.rewards.names": "redness", "config.rewards.coefs": "1.0",
                  "config.psm.smooth_sigma": 1.0, "config.log.num_eval_prompts": 8,
                  **({"config.train.iterations": 10, "config.log.eval_every": 0} if arg == "quick" else {})},
    }
