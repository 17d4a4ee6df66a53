"""The paper's in-domain vs out-of-domain question in the toy world: train on the toy CLIP score
(the in-domain reward) with plain GRPO and with ViPO, then score the base model and both runs on
the 54 held-out prompt combinations with every toy metric (out-of-domain: digit accuracy, colour
match, redness; in-domain: the toy CLIP score itself).

COMMAND:
  python -m launch.sweep --sweep=configs/sweeps/toy_clip.py --workdir=runs/toy_clip
  python -m launch.report --workdir=runs/toy_clip
  python -m vipo_jax.evaluate --config=configs/flux.py:toy --config.rewards.names=toy_clip --config.rewards.coefs=1.0 \\
      --checkpoint=base --checkpoint=grpo='runs/toy_clip/grpo_seed-*' --checkpoint=vipo='runs/toy_clip/vipo_seed-*' \\
      --out=runs/toy_clip/eval
Results: docs/EXPERIMENTS.md (b).
"""

from __future__ import annotations

SEEDS = [0, 1, 2]


def get_sweep(arg: str | None = None) -> dict:
    arg = (arg or "").strip()
    if arg not in ("", "quick"):
        raise ValueError(f"configs/sweeps/toy_clip.py: unknown argument {arg!r}; use quick or nothing")
    seeds = SEEDS[:1] if arg == "quick" else SEEDS
    # No periodic evaluation: the held-out evaluation after training is the measurement.
    # the settings of docs/EXPERIMENTS.md (b): lr 5e-5 and sigma 1 (the toy defaults then)
    fixed = {"config.rewards.names": "toy_clip", "config.rewards.coefs": "1.0", "config.log.eval_every": 0,
             "config.optim.lr": 5e-5, "config.psm.smooth_sigma": 1.0}
    if arg == "quick":
        fixed["config.train.iterations"] = 10
    return {
        "config": "configs/flux.py:toy",
        "grids": {
            "grpo": {"config.psm.enabled": [False], "config.seed": seeds},
            "vipo": {"config.psm.enabled": [True], "config.seed": seeds},
        },
        "name": "{label}_seed-{seed}",
        "fixed": fixed,
    }
