"""Time of each phase of one ViPO iteration in the toy world, and the PSM's overhead.

    python benchmarks/step_breakdown.py [--repeats 5] [--config.x=...]
    python benchmarks/step_breakdown.py --config=configs/wan.py:toy   # the video step

Each time is the minimum over ``--repeats`` runs. Phases are jitted separately at the shapes of
the real step (rollout, VAE decode, reward, PSM =
DINOv2 features + map, policy update), and the whole step is timed twice: with the PSM (ViPO) and
without (plain GRPO), which gives the overhead the paper reports (+1.4% step time for images,
+4.8% for video).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/flux.py:toy", "config")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed repeats (the minimum is reported)")


def timeit(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return min(ts)  # the least disturbed run: 2 shared cores make medians drift


def main(argv):
    del argv
    from vipo_jax import rl
    from vipo_jax.training.optim import make_optimizer
    from vipo_jax.training.run import init_state
    from vipo_jax.training.step import repeat_groups, train_step_for
    from vipo_jax.training.step_config import StepConfig
    from vipo_jax.utils.compile_cache import enable_compilation_cache
    from vipo_jax.worlds import build_world

    enable_compilation_cache()
    c = _CONFIG.value
    world = build_world(c)
    sc = StepConfig.from_config(c)
    r = _REPEATS.value
    params = world.params
    batch = world.batch(world.prompt_loader(c.sampling.prompts_per_iter, c.seed).next())
    G = sc.group_size
    cond = repeat_groups(batch["cond"], G)
    P = jax.tree.leaves(batch["cond"])[0].shape[0]
    sigmas = rl.sigma_schedule(sc.num_steps, sc.shift)

    rollout = jax.jit(lambda p, k: rl.rollout(lambda x, s, cc: world.velocity_fn(p, x, s, cc),
                                              rl.initial_noise(k, P, G, world.latent_shape), cond, sigmas,
                                              sc.eta, k))
    ro = rollout(params, jax.random.PRNGKey(0))
    decode = jax.jit(world.decode_fn)
    images = decode(world.frozen, ro["x0"])
    per_sample = repeat_groups({k: v for k, v in batch.items() if k != "cond"}, G)
    rewards = jax.jit(lambda f, im: {n: fn(f, im, per_sample) for n, fn in world.rewards.items()})
    psm_opts = sc.psm or rl.PSMOptions()
    if len(world.latent_shape) == 4:  # video: per-frame maps -> latent frames -> temporal smoothing
        psm = jax.jit(lambda f, im: rl.psm_map_video(world.feature_fn(f, im), world.latent_shape[:3], psm_opts))
    else:
        psm = jax.jit(lambda f, im: rl.psm_map(world.feature_fn(f, im), world.latent_shape[:2], psm_opts))

    times = {
        "rollout": timeit(rollout, params, jax.random.PRNGKey(0), repeats=r),
        "decode": timeit(decode, world.frozen, ro["x0"], repeats=r),
        "reward": timeit(rewards, world.frozen, images, repeats=r),
        "psm": timeit(psm, world.frozen, images, repeats=r),
    }
    opt = make_optimizer(c)
    full = {}
    for name, enabled in (("grpo", False), ("vipo", True), ("grpo_again", False)):
        cfg = dataclasses.replace(sc, psm=psm_opts if enabled else None)
        step = jax.jit(train_step_for(world, cfg, opt))
        state = init_state(params, opt, c.seed)
        full[name] = timeit(lambda s, step=step: step(s, world.frozen, batch)[1], state, repeats=r)
    times["update (rest of the step)"] = max(0.0, full["vipo"] - sum(times.values()))
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), jax {jax.__version__}; batch {P}x{G}, {sc.num_steps} steps, "
          f"{sc.num_train_timesteps} trained, latent {world.latent_shape}")
    print("\n| phase | ms | share of ViPO step |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * v:.1f} | {100 * v / full['vipo']:.1f}% |")
    print(f"| **whole step, ViPO** | {1e3 * full['vipo']:.1f} | 100% |")
    grpo = min(full["grpo"], full["grpo_again"])
    print(f"| whole step, GRPO (psm.enabled=False), timed before / after | {1e3 * full['grpo']:.1f} / "
          f"{1e3 * full['grpo_again']:.1f} | |")
    paper = "+4.8% on Wan2.1" if len(world.latent_shape) == 4 else "+1.4% on FLUX.1 at 512^2"
    print(f"\nPSM overhead: {100 * (full['vipo'] / grpo - 1):+.1f}% step time (paper: {paper}); "
          f"PSM phase alone {100 * times['psm'] / full['vipo']:.1f}% of the step")


if __name__ == "__main__":
    app.run(main)
