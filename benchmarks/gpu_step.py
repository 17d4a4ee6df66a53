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
import optax
from flax import nnx

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
    from vipo_jax.training.run import init_state, make_optimizer
    from vipo_jax.training.step import make_train_step
    from vipo_jax.worlds import build_world

    c = get_config("toy")
    world = build_world(c)
    opt = make_optimizer(c)
    step = make_train_step(world.step_config, velocity_fn=world.velocity_fn, decode_fn=world.decode_fn,
                           reward_fns=world.reward_fns, feature_fn=world.feature_fn, optimizer=opt,
                           latent_shape=world.latent_shape)
    _, params = nnx.split(world.policy)
    batch = world.batch(world.prompt_loader(c).next())
    state = init_state(jax.tree.map(jnp.copy, params), opt, 0)
    tc, ti, fl = time_step(step, state, world.frozen, batch, repeats)
    return {"name": "toy (64^2, 4 prompts x G 8, 8 steps)", "compile_s": tc, "iter_s": ti, "flops": fl}


def wide_step(a, repeats: int) -> dict:
    from vipo_jax.models.dinov2 import Dinov2Model, preset
    from vipo_jax.models.dinov2.model import patch_tokens
    from vipo_jax.models.dinov2.model import preprocess as dino_pre
    from vipo_jax.models.flux import FluxConfig, FluxTransformer
    from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
    from vipo_jax.models.vae.model import decode_to_unit
    from vipo_jax.plan.flops import flux_forward_flops, iteration_flops
    from vipo_jax.toy.rewards import redness
    from vipo_jax.training.run import init_state
    from vipo_jax.training.step import StepConfig, make_train_step
    from vipo_jax.worlds.flux_policy import flux_velocity

    fcfg = FluxConfig(guidance_embeds=True, num_layers=a.double, num_single_layers=a.single, dtype="bfloat16",
                      remat=a.remat, attention=a.attention)
    policy = FluxTransformer(fcfg, rngs=nnx.Rngs(0))
    vae = AutoencoderKL(AutoencoderKLConfig.flux1(dtype="bfloat16"), rngs=nnx.Rngs(1))
    dino = Dinov2Model(preset("vit_l14", dtype="bfloat16", attention=a.attention), rngs=nnx.Rngs(2))
    gd, params = nnx.split(policy)
    gv, fv = nnx.split(vae)
    gdn, fd = nnx.split(dino)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def velocity_fn(p, x, sigma, cond):
        return flux_velocity(nnx.merge(gd, p), x, sigma, cond["t5"], cond["pooled"],
                             jnp.full((x.shape[0],), 3.5, jnp.float32))

    def decode_fn(frozen, x0):
        return decode_to_unit(nnx.merge(gv, frozen["vae"]), x0)

    def feature_fn(frozen, images):
        m = nnx.merge(gdn, frozen["dinov2"])
        return patch_tokens(m, dino_pre(images, images.shape[1:3], patch_size=14))[0]

    sc = StepConfig(num_steps=8, shift=3.0, eta=0.3, group_size=a.group, micro_batch=a.micro_batch)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=1e-4))
    step = make_train_step(sc, velocity_fn=velocity_fn, decode_fn=decode_fn,
                           reward_fns={"reward": lambda f, im, b: redness(im)}, feature_fn=feature_fn,
                           optimizer=opt, latent_shape=(64, 64, 16))
    batch = {"cond": {"t5": jax.random.normal(jax.random.PRNGKey(3), (1, 512, 4096), jnp.bfloat16),
                      "pooled": jax.random.normal(jax.random.PRNGKey(4), (1, 768), jnp.float32)}}
    state = init_state(params, opt, 0)
    frozen = {"vae": fv, "dinov2": fd}
    x0 = jax.ShapeDtypeStruct((a.group, 64, 64, 16), jnp.float32)
    im = jax.ShapeDtypeStruct((a.group, 512, 512, 3), jnp.float32)
    frozen_flops = _xla_flops(decode_fn, frozen, x0) + _xla_flops(feature_fn, frozen, im)
    analytic = iteration_flops(flux_forward_flops(fcfg, 1024, 512), samples=a.group, num_steps=sc.num_steps,
                               trained_steps=sc.num_train_timesteps, remat=a.remat, frozen=frozen_flops)
    tc, ti, fl = time_step(step, state, frozen, batch, repeats)
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
