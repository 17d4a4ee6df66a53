"""One ViPO iteration on an accelerator: the toy step, and a step at FLUX.1-dev width (3072, 24
heads x 128, the real VAE and DINOv2-L, 512x512, T5 length 512) with fewer blocks so one GPU holds
it, with the cuDNN attention kernel. Prints iteration time, XLA's FLOP count and the MFU against
a bf16 matmul measured in the same run.

    python benchmarks/gpu_step.py [--double 2] [--single 4] [--group 8] [--micro_batch 4] [--attention cudnn]

Random weights (speed does not depend on them); reward = redness (the reward model's cost is a
small part at this size); the whole step (rollout, decode, reward, PSM, update) is one jit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def matmul_peak(dtype=jnp.bfloat16, n: int = 8192, reps: int = 10) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def time_step(step, state, frozen, batch, repeats: int) -> tuple[float, float, float]:
    """(compile seconds, min iteration seconds, FLOPs per iteration from XLA's cost analysis)."""
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile()
    t_compile = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, m = compiled(state, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return t_compile, min(times), flops


def _xla_flops(fn, *args) -> float:
    from vipo_jax.nn.stack import unrolled_stacks

    with unrolled_stacks():
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def toy_step(repeats: int) -> dict:
    from configs.flux import get_config
    from vipo_jax.training.optim import make_optimizer
    from vipo_jax.training.run import init_state
    from vipo_jax.training.step import train_step_for
    from vipo_jax.training.step_config import StepConfig
    from vipo_jax.worlds import build_world

    c = get_config("toy")
    world = build_world(c)
    opt = make_optimizer(c)
    step = train_step_for(world, StepConfig.from_config(c), opt)
    batch = world.batch(world.prompt_loader(c.sampling.prompts_per_iter, 0).next())
    state = init_state(jax.tree.map(jnp.copy, world.params), opt, 0)
    tc, ti, fl = time_step(step, state, world.frozen, batch, repeats)
    return {"name": "toy (64^2, 4 prompts x G 8, 8 steps)", "compile_s": tc, "iter_s": ti, "flops": fl}


def wide_config(a):
    """The FLUX.1-dev recipe at 512^2 with random weights (``world=random``), ``a.double`` + ``a.single``
    blocks at the real width, one prompt x G ``a.group``, redness as the reward."""
    from configs.flux import get_config

    c = get_config("")
    c.world = "random"
    c.model.arch = f"num_layers={a.double},num_single_layers={a.single}"
    c.model.remat, c.model.attention = a.remat, a.attention
    c.sampling.group_size, c.sampling.prompts_per_iter = a.group, 1
    c.train.micro_batch = a.micro_batch
    c.rewards.names, c.rewards.coefs = "redness", "1.0"
    return c


def wide_step(a, repeats: int) -> dict:
    from vipo_jax.models.flux.flops import flux_forward_flops
    from vipo_jax.training.optim import make_optimizer
    from vipo_jax.training.run import init_state
    from vipo_jax.training.step import train_step_for
    from vipo_jax.training.step_config import StepConfig
    from vipo_jax.training.throughput import iteration_flops
    from vipo_jax.worlds import build_world

    c = wide_config(a)
    world = build_world(c)
    fcfg = world.policy().cfg
    n_params = sum(x.size for x in jax.tree.leaves(world.params))
    sc = StepConfig.from_config(c)
    opt = make_optimizer(c)
    step = train_step_for(world, sc, opt)
    batch = world.batch(np.arange(1))
    state = init_state(world.params, opt, 0)
    x0 = jax.ShapeDtypeStruct((a.group,) + tuple(world.latent_shape), jnp.float32)
    im = jax.ShapeDtypeStruct((a.group, 512, 512, 3), jnp.float32)
    frozen_flops = _xla_flops(world.decode_fn, world.frozen, x0) + _xla_flops(world.feature_fn, world.frozen, im)
    analytic = iteration_flops(flux_forward_flops(fcfg, 1024, 512), samples=a.group, num_steps=sc.num_steps,
                               trained_steps=sc.num_train_timesteps, remat=a.remat, frozen=frozen_flops)
    tc, ti, fl = time_step(step, state, world.frozen, batch, repeats)
    return {"analytic": analytic,
            "name": f"FLUX width, {a.double}+{a.single} blocks ({n_params / 1e9:.2f}B), 512^2, 1 prompt x G "
                    f"{a.group}, mb {a.micro_batch}, {a.attention}, remat {a.remat}",
            "compile_s": tc, "iter_s": ti, "flops": fl, "sc": dataclasses.asdict(sc)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", default="full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_toy", action="store_true")
    a = p.parse_args()
    dev = jax.devices()[0]
    peak = matmul_peak()
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s")
    rows = ([] if a.skip_toy else [toy_step(a.repeats)]) + [wide_step(a, a.repeats)]
    print("\n| step | compile s | iteration s | model TFLOP / it (analytic) | + remat recompute | "
          "model TFLOP/s | MFU vs measured peak | HW FLOP util |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        an = r.get("analytic")
        if an is None:  # XLA counts loop bodies once: for the toy only a lower bound is printed
            print(f"| {r['name']} | {r['compile_s']:.1f} | {r['iter_s']:.3f} | >= {r['flops'] / 1e12:.3f} (XLA) "
                  f"| | | | |")
            continue
        m, h = an.model_flops / r["iter_s"], an.hardware_flops / r["iter_s"]
        print(f"| {r['name']} | {r['compile_s']:.1f} | {r['iter_s']:.3f} | {an.model_flops / 1e12:.1f} | "
              f"{an.recompute / 1e12:.1f} | {m / 1e12:.0f} | {100 * m / peak:.1f}% | {100 * h / peak:.1f}% |")


if __name__ == "__main__":
    main()
