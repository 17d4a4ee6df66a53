"""Plan a full-size run without its weights: build the models abstractly (``nnx.eval_shape``),
lower and compile the real train step for a mesh against abstract inputs, and read per-device
memory from XLA's memory analysis; FLOPs come from the analytic formulas (``flops.py``), checked
against XLA's count of one unrolled block pair at the real width and sequence length.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from vipo_jax import sharding as shd
from vipo_jax.nn.stack import unrolled_stacks
from vipo_jax.training.checks import check_config
from vipo_jax.training.optim import make_optimizer
from vipo_jax.training.run import init_state
from vipo_jax.training.step import jit_train_step, train_step_for
from vipo_jax.training.throughput import frozen_phase_flops, iteration_flops
from vipo_jax.utils.devices import Device
from vipo_jax.worlds import build_world

GiB = 2**30


def _bytes_per_device(tree: Any, shardings: Any) -> float:
    total = 0.0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(tuple(x.shape))) * jnp.dtype(x.dtype).itemsize
    return total


def _xla_flops(fn, *args) -> float:
    with unrolled_stacks():
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def plan(c: mlc.ConfigDict, device: Device, *, mfu: float = 0.4, mesh: jax.sharding.Mesh | None = None,
         check_flops: bool = True) -> dict:
    """Compile the configured train step for ``mesh`` (default: ``c.mesh`` over all devices) against
    abstract inputs (``build_world(c, source="abstract")``: the recipe's models, rewards and PSM
    backbone as shapes) and return its per-device memory and per-iteration FLOPs and time estimate."""
    sc = check_config(c)
    world = build_world(c, source="abstract")
    policy = world.policy()
    mesh = mesh or shd.make_mesh(c.get("mesh"))
    rules = shd.rules_from_config(c)
    n_dev = mesh.devices.size
    opt: optax.GradientTransformation = make_optimizer(c)
    state = jax.eval_shape(lambda p: init_state(p, opt, 0), world.params)
    state_sh = shd.param_shardings(state, rules, mesh)
    frozen_sh = shd.param_shardings(world.frozen, rules, mesh)
    batch = world.train_prompts.shapes(int(c.sampling.prompts_per_iter))
    batch_sh = jax.tree.map(lambda x: shd.batch_sharding(x.shape, mesh, rules), batch)
    step = train_step_for(world, sc, opt)
    t0 = time.perf_counter()
    with shd.activate(mesh, rules):
        jitted = jit_train_step(step, state_shardings=state_sh, frozen_shardings=frozen_sh,
                                batch_shardings=batch_sh, mesh=mesh)
        compiled = jitted.lower(state, world.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    B = c.sampling.prompts_per_iter * c.sampling.group_size
    frozen_flops = frozen_phase_flops(world, sc, batch, compile=False)  # decode, rewards, PSM (XLA)
    it = iteration_flops(world.family.forward_flops(c, policy), samples=B, num_steps=sc.num_steps,
                         trained_steps=sc.num_train_timesteps, remat=c.model.remat,
                         cfg_passes=world.family.cfg_passes(world.options), frozen=sum(frozen_flops.values()))
    out = {
        "model": world.family.describe(c), "mesh": dict(mesh.shape), "devices": n_dev, "device": device.name,
        "samples_per_iteration": B, "compile_s": compile_s, "rewards": [n for n, _ in sc.rewards],
        "params_gib": _bytes_per_device(state["params"], state_sh["params"]) / GiB,
        "optimizer_gib": _bytes_per_device(state["opt_state"], state_sh["opt_state"]) / GiB,
        "frozen_gib": _bytes_per_device(world.frozen, frozen_sh) / GiB,
        "frozen_parts_gib": {k: _bytes_per_device(v, frozen_sh[k]) / GiB for k, v in world.frozen.items()},
        "gradients_gib": sum(math.prod(sh.shard_shape(tuple(x.shape))) * 4 for x, sh in zip(
            jax.tree.leaves(state["params"]), jax.tree.leaves(state_sh["params"]), strict=True)) / GiB,
        "arguments_gib": mem.argument_size_in_bytes / GiB if mem else float("nan"),
        "temporaries_gib": mem.temp_size_in_bytes / GiB if mem else float("nan"),
        "outputs_gib": mem.output_size_in_bytes / GiB if mem else float("nan"),
        "aliased_gib": mem.alias_size_in_bytes / GiB if mem else float("nan"),
        "model_tflop": it.model_flops / 1e12, "hardware_tflop": it.hardware_flops / 1e12,
        "phase_tflop": {"rollout": it.rollout / 1e12, "update": it.train / 1e12,
                        **{k: v / 1e12 for k, v in frozen_flops.items()}},
        "mfu": mfu,
    }
    out["peak_gib"] = out["arguments_gib"] + out["temporaries_gib"] + out["outputs_gib"] - out["aliased_gib"]
    out["fits"] = bool(out["peak_gib"] <= device.memory_gib)
    out["predicted_s"] = it.hardware_flops / n_dev / (device.bf16_tflops * 1e12 * mfu)
    if check_flops:
        analytic, fn, args = world.family.flops_probe(c, policy)
        xla = _xla_flops(fn, *args)
        out["flops_check"] = {"analytic_tflop": analytic / 1e12, "xla_tflop": xla / 1e12,
                              "rel_diff": float(analytic / xla - 1) if xla else float("nan")}
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | mesh | device | params | optimizer | frozen | XLA args | XLA temps (activations, grads) | "
            "peak / device | fits | TFLOP / it (model / HW) | predicted s / it @ MFU |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        mesh = "×".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        lines.append(
            f"| {r['model']}, {r['samples_per_iteration']} samples/it | {mesh} | {r['device']} | "
            f"{r['params_gib']:.2f} | {r['optimizer_gib']:.2f} | {r['frozen_gib']:.2f} | {r['arguments_gib']:.2f} | "
            f"{r['temporaries_gib']:.2f} | {r['peak_gib']:.2f} GiB | {'yes' if r['fits'] else 'NO'} | "
            f"{r['model_tflop']:.0f} / {r['hardware_tflop']:.0f} | {r['predicted_s']:.1f} @ {100 * r['mfu']:.0f}% |")
    return "\n".join(lines)


def phases_line(r: dict) -> str:
    """The iteration's model TFLOP by phase: where the FLOPs go."""
    ph = r.get("phase_tflop") or {}
    return "TFLOP by phase: " + ", ".join(f"{k} {v:.4g}" for k, v in ph.items())


def flops_check_line(r: dict) -> str:
    f = r.get("flops_check")
    if not f:
        return ""
    return (f"FLOP check (one block pair at full width and sequence, unrolled): analytic {f['analytic_tflop']:.3f} "
            f"TFLOP vs XLA {f['xla_tflop']:.3f} TFLOP ({100 * f['rel_diff']:+.1f}%)")


__all__ = ["flops_check_line", "phases_line", "plan", "table"]
