"""Does the advantage map put the credit where the reward lives? Region rewards with controls.

Every run: configs/flux.py:toy at lr 3e-5 for 40 iterations (the reward rises well before the
images lose their digit), one evaluation at the end. Seeds 0, 1, 2 for every cell; a seed fixes the
prompts and noises, so the cells of one reward are paired by seed.

Rewards (``rewards.names``):
  redness             the whole image's redness (global: the map has no region to find)
  subject_redness     the redness of the digit's pixels only (the subject mask from the image itself)
  background_redness  the redness of the background's pixels only
  digit_logprob       log-probability of the prompted digit under the toy classifier (structure)
Methods:
  grpo      psm.enabled=False: one advantage per sample (DanceGRPO)
  vipo      the map M on the advantage (the default)
  inverted  1 - M: credit moved to where the map says the background is
  mean_map  every sample gets the batch's mean map: the map's location without its per-image shape
  grpo2x    GRPO with twice the prompts per iteration (8 groups): more samples instead of a map

The signature the mechanism predicts, written before the runs: subject_redness and digit_logprob
vipo > grpo > inverted; background_redness reversed (inverted > grpo > vipo); redness about equal;
mean_map between grpo and vipo (the toy digits sit in the centre, so the mean map already finds
most of the subject: AUC 0.94 vs 0.99 per image, benchmarks/psm_maps.py).

Cells (``CELLS``, in the order they run): every reward x {grpo, vipo, inverted}; mean_map for every
reward but redness; grpo2x for subject_redness and digit_logprob (the budget of a 2-core machine:
17 cells x 3 seeds = 51 runs); ``:full`` runs all 20 cells.

COMMAND:
  python -m launch.sweep --sweep=configs/sweeps/toy_region_rewards.py --workdir=runs/toy_region_rewards
  python -m launch.report --workdir=runs/toy_region_rewards --paired=grpo
  python -m vipo_jax.evaluate --config=configs/flux.py:toy --out=runs/toy_region_rewards/eval \\
      --checkpoint=base --checkpoint='subject_redness-vipo=runs/toy_region_rewards/subject_redness-vipo_seed-*' ...
  python -m launch.report --workdir=runs/toy_region_rewards --paired=grpo \\
      --eval=runs/toy_region_rewards/eval/results.json
Results: docs/EXPERIMENTS.md (d).
"""

from __future__ import annotations

SEEDS = [0, 1, 2]
REWARDS = ["subject_redness", "background_redness", "digit_logprob", "redness"]
METHODS: dict[str, dict] = {
    "grpo": {"config.psm.enabled": [False]},
    "vipo": {},
    "inverted": {"config.psm.control": ["inverted"]},
    "mean_map": {"config.psm.control": ["mean_map"]},
    "grpo2x": {"config.psm.enabled": [False], "config.sampling.prompts_per_iter": [8]},
}
#: (reward, method) cells in the order they run: the comparisons the signature is about first, the
#: controls after, so that a sweep cut short has the core cells with all their seeds.
CELLS = [(r, m) for r in ("subject_redness", "background_redness", "digit_logprob")
         for m in ("grpo", "vipo", "inverted")]
CELLS += [("subject_redness", "mean_map"), ("subject_redness", "grpo2x"), ("redness", "grpo"), ("redness", "vipo"),
          ("redness", "inverted"), ("background_redness", "mean_map"), ("digit_logprob", "mean_map"),
          ("digit_logprob", "grpo2x")]


def get_sweep(arg: str | None = None) -> dict:
    arg = (arg or "").strip()
    if arg not in ("", "quick", "full"):
        raise ValueError(f"configs/sweeps/toy_region_rewards.py: unknown argument {arg!r}; use quick, full or nothing")
    seeds = SEEDS[:1] if arg == "quick" else SEEDS
    cells = [(r, m) for r in REWARDS for m in METHODS] if arg == "full" else CELLS
    grids = {f"{r}-{m}": {"config.rewards.names": [r], **METHODS[m], "config.seed": seeds} for r, m in cells}
    iters = 4 if arg == "quick" else 40
    return {
        "config": "configs/flux.py:toy",
        "grids": grids,
        "name": "{label}_seed-{seed}",
        # the settings docs/EXPERIMENTS.md (d) ran with, pinned against later changes of the toy default
        "fixed": {"config.train.iterations": iters, "config.optim.lr": 3e-5, "config.log.eval_every": iters,
                  "config.log.ckpt_every": iters, "config.psm.smooth_sigma": 0.5, "config.log.num_eval_prompts": 8},
    }
