"""Throughput of an iteration, phase by phase: FLOPs, measured times and MFU.

FLOPs (2 per multiply-add): the policy's rollout and update from its analytic forward count (the
family's ``forward_flops``, ``vipo_jax/models/*/flops.py``: XLA's cost analysis counts a loop body
once, whatever its trip count, so the scanned rollout and update cannot be read from it); the
decode, the rewards and the PSM (backbone + map) from XLA's cost analysis of each phase compiled
alone with its layer stacks unrolled. Times: each phase jitted alone at the step's shapes, run once
to warm up and once timed; the update is the rest of a whole-step time. MFU is model FLOPs per
second over the device's peak: the vendor's dense bf16 figure for a known accelerator
(``vipo_jax.utils.devices``), else a matmul measured here (float32 on CPU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vipo_jax import rl
from vipo_jax.nn.stack import unrolled_stacks
from vipo_jax.training.step import in_micro_batches, repeat_groups
from vipo_jax.utils.devices import current_device

PHASES = ("rollout", "decode", "rewards", "psm", "update")


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


def xla_flops(fn: Callable, *args: Any, compile: bool = True) -> float:
    """XLA's FLOP count of ``fn(*args)`` with every layer stack unrolled (0 where not reported).
    ``args`` may be abstract (``jax.ShapeDtypeStruct``); ``compile=False`` counts the lowered
    program without compiling it (the planner's full-size models: seconds instead of minutes)."""
    with unrolled_stacks():
        lowered = jax.jit(fn).lower(*args)
        cost = lowered.compile().cost_analysis() if compile else lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def frozen_phase_flops(world: Any, cfg: Any, batch: dict, *, compile: bool = True) -> dict[str, float]:
    """XLA's FLOPs of one iteration's decode, rewards and PSM (backbone + map) at the step's shapes,
    from shapes alone (``batch``: one iteration's per-prompt batch, arrays or ShapeDtypeStructs)."""
    G = cfg.group_size
    P = jax.tree.leaves(batch["cond"])[0].shape[0]
    x0 = jax.ShapeDtypeStruct((P * G,) + tuple(world.latent_shape), jnp.float32)
    images = jax.eval_shape(world.decode_fn, world.frozen, x0)
    per_sample = jax.eval_shape(lambda b: repeat_groups(b, G), {k: v for k, v in batch.items() if k != "cond"})

    def rewards(fr, im, b):
        return {n: fn(fr, im, b) for n, fn in world.rewards.items()}

    out = {"decode": xla_flops(world.decode_fn, world.frozen, x0, compile=compile),
           "rewards": xla_flops(rewards, world.frozen, images, per_sample, compile=compile)}
    if cfg.psm is not None and world.has_backbone:
        out["psm"] = xla_flops(lambda fr, im, lat: world.psm_maps(fr, im, lat, cfg.psm), world.frozen, images, x0,
                               compile=compile)
    return out


def matmul_peak(dtype: Any = None, n: int | None = None, reps: int = 3) -> float:
    """Measured FLOP/s of a square matmul on the default device (float32 2048^2 on CPU, bf16 8192^2
    on an accelerator): the reference MFU is computed against where no vendor figure applies."""
    cpu = jax.devices()[0].platform == "cpu"
    dtype = dtype or (jnp.float32 if cpu else jnp.bfloat16)
    n = n or (2048 if cpu else 8192)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak() -> tuple[float, str]:
    """(peak FLOP/s, what it is) of this process's device."""
    d = current_device()
    if d is not None:
        return d.bf16_tflops * 1e12, f"{d.name} dense bf16 peak (vendor)"
    platform = jax.devices()[0].platform
    if platform == "cpu":
        return matmul_peak(), "measured float32 matmul on the CPU"
    return matmul_peak(), f"measured bf16 matmul on the {platform}"


def _best_time(fn: Callable[[], Any], repeats: int = 2) -> float:
    """The shortest of ``repeats`` timed calls after a warm-up: a phase timed once on a busy
    machine can take longer than the whole step's typical time, leaving the update (the step
    minus the phases) nothing."""
    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def profile_phases(world: Any, cfg: Any, params: Any, frozen: Any, batch: dict, *, micro_batch: int,
                   remat: str, forward_flops: float) -> dict[str, float]:
    """Times and FLOPs of an iteration's rollout, decode, rewards and PSM, each jitted alone at the
    step's shapes (``params``: the policy's full parameters; ``batch``: one iteration's batch), and
    the analytic FLOPs of the update. Returns ``phase/<name>_s`` (not for the update: the caller
    subtracts these from a whole-step time), ``phase/<name>_tflop`` and ``phase/peak_tflops``."""
    G, S = cfg.group_size, cfg.num_steps
    P = jax.tree.leaves(batch["cond"])[0].shape[0]
    B = P * G
    mb = micro_batch or B // cfg.num_updates
    sigmas = rl.sigma_schedule(S, cfg.shift)
    cond = repeat_groups(batch["cond"], G)
    per_sample = repeat_groups({k: v for k, v in batch.items() if k != "cond"}, G)
    x_init = rl.initial_noise(jax.random.PRNGKey(0), P, G, tuple(world.latent_shape))
    key = jax.random.PRNGKey(1)

    def rollout(p, x, c):
        vel = in_micro_batches(lambda xx, s, cc: world.velocity_fn(p, xx, s, cc), B, mb)
        return rl.rollout(vel, x, c, sigmas, cfg.eta, key)["x0"]

    decode = world.decode_fn

    def rewards(fr, images, b):
        return {n: fn(fr, images, b) for n, fn in world.rewards.items()}

    jit_rollout, jit_decode, jit_rewards = jax.jit(rollout), jax.jit(decode), jax.jit(rewards)
    out: dict[str, float] = {}
    out["phase/rollout_s"] = _best_time(lambda: jit_rollout(params, x_init, cond))
    x0 = jit_rollout(params, x_init, cond)
    out["phase/decode_s"] = _best_time(lambda: jit_decode(frozen, x0))
    images = jit_decode(frozen, x0)
    out["phase/rewards_s"] = _best_time(lambda: jit_rewards(frozen, images, per_sample))
    if cfg.psm is not None and world.has_backbone:
        jit_psm = jax.jit(lambda fr, im, lat: world.psm_maps(fr, im, lat, cfg.psm))
        out["phase/psm_s"] = _best_time(lambda: jit_psm(frozen, images, x0))
    frozen_flops = frozen_phase_flops(world, cfg, batch)
    it = iteration_flops(forward_flops, samples=B, num_steps=S, trained_steps=cfg.num_train_timesteps, remat=remat,
                         cfg_passes=world.family.cfg_passes(world.options))
    out["phase/rollout_tflop"] = it.rollout / 1e12
    out["phase/update_tflop"] = it.train / 1e12
    out["phase/update_recompute_tflop"] = it.recompute / 1e12
    for k, v in frozen_flops.items():
        out[f"phase/{k}_tflop"] = v / 1e12
    peak, what = device_peak()
    out["phase/peak_tflops"] = peak / 1e12
    out["_peak_source"] = what  # type: ignore[assignment]
    return out


def phase_report(profile: dict, step_s: float) -> dict[str, float]:
    """The update's time (the step minus the other phases), every phase's MFU, and the step's:
    model FLOPs per second over the peak."""
    out = {k: v for k, v in profile.items() if not k.startswith("_")}
    measured = sum(out.get(f"phase/{p}_s", 0.0) for p in PHASES if p != "update")
    out["phase/update_s"] = max(step_s - measured, 0.0)
    peak = out["phase/peak_tflops"]
    total = 0.0
    for p in PHASES:
        tflop = out.get(f"phase/{p}_tflop")
        if tflop is None:
            continue
        total += tflop
        t = out.get(f"phase/{p}_s", 0.0)
        out[f"phase/{p}_mfu"] = tflop / t / peak if t > 0 else 0.0
    out["phase/step_tflop"] = total
    out["phase/step_s"] = step_s
    out["phase/step_mfu"] = total / step_s / peak if step_s > 0 else 0.0
    return out
