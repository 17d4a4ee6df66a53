"""Analytic FLOP count (2 per multiply-add) of one ViPO iteration from its policy's forward
(``vipo_jax.models.flux.flops``, ``vipo_jax.models.wan.flops``). XLA's cost analysis counts a loop
body once, whatever its trip count (the layer scan, the rollout scan, the update scans), so
iteration totals come from here; the planner checks the forward formulas against XLA on loop-free
(unrolled) forwards.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class IterationFlops:
    rollout: float
    train: float  # forward + backward of the trained transitions (model FLOPs, no recompute)
    recompute: float  # remat's extra forwards (hardware FLOPs, not model FLOPs)
    frozen: float  # decode, reward models, PSM backbone (XLA-counted or estimated by the caller)

    @property
    def model_flops(self) -> float:
        return self.rollout + self.train + self.frozen

    @property
    def hardware_flops(self) -> float:
        return self.model_flops + self.recompute


def iteration_flops(forward: float, *, samples: int, num_steps: int, trained_steps: int, num_updates: int = 1,
                    remat: str = "none", cfg_passes: int = 1, frozen: float = 0.0) -> IterationFlops:
    """One ViPO iteration from the per-sample policy forward ``forward``: the rollout runs
    ``num_steps`` forwards per sample; training runs forward + backward (3x) per trained step and
    sample, once per update chunk's samples (each sample is trained in exactly one chunk), plus one
    recomputed forward under remat. ``cfg_passes`` = 2 with true classifier-free guidance (Wan)."""
    del num_updates  # chunks partition the samples: the total does not depend on their number
    f = forward * cfg_passes
    rollout = samples * num_steps * f
    train = samples * trained_steps * 3 * f
    recompute = samples * trained_steps * f if remat != "none" else 0.0
    return IterationFlops(rollout=rollout, train=train, recompute=recompute, frozen=frozen)
