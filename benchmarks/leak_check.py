"""Where does credit given at some positions change the image? The toy world's leak check.

    python benchmarks/leak_check.py [--reward redness] [--batches 4] [--prompts 8] [--lr 0.2]

One training batch of the embedded toy policy (P prompts x G 8, SDE rollout, the trained reward's
group advantages), then one plain SGD step of the policy loss with the advantage multiplied by a
chosen credit map: all ones (GRPO), the digit's latent cells only, the background's only, the PSM
map (ViPO) or 1 - map. The stepped policy samples the 54 held-out prompts with the ODE from fixed
noises; the table gives how much the digit's and the background's redness moved (vs the unstepped
policy, per step, mean over ``--batches`` batches) and the cosine between each step and GRPO's.

If credit at background positions reddens the digit as much as the background, the model cannot
localise a colour update, and a map cannot separate ViPO from GRPO under a global reward: the
mechanism needs a reward that lives in a region (``configs/sweeps/toy_region_rewards.py``).
SGD (no Adam, no clipping) keeps the step proportional to the gradient, so the numbers are a linear
response: halving ``--lr`` halves them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import flux  # noqa: E402
from vipo_jax import rl  # noqa: E402
from vipo_jax.rewards.regions import background_redness, subject_mask, subject_redness  # noqa: E402
from vipo_jax.toy import digits  # noqa: E402
from vipo_jax.training.step import make_policy_update, make_rollout_and_score, make_sampler  # noqa: E402
from vipo_jax.training.step_config import StepConfig  # noqa: E402
from vipo_jax.worlds import build_world  # noqa: E402

CREDITS = ("all (GRPO)", "digit cells only", "background cells only", "PSM map (ViPO)", "1 - map (inverted)")


def latent_subject(images: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, h, w) 1 where most of a latent cell's pixels belong to the subject."""
    m = subject_mask(images)
    b, hh, ww = m.shape
    h, w = grid
    return (m.reshape(b, h, hh // h, w, ww // w).mean((2, 4)) > 0.5).astype(jnp.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", default="redness", help="the credited reward (a toy reward name)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.2, help="SGD step size")
    a = p.parse_args(argv)

    c = flux.get_config("toy")
    c.rewards.names, c.rewards.coefs = a.reward, "1.0"
    c.sampling.prompts_per_iter = a.prompts
    world = build_world(c)
    cfg = StepConfig.from_config(c)
    grid = tuple(world.latent_shape[:2])
    rollout = jax.jit(make_rollout_and_score(cfg, velocity_fn=world.velocity_fn, decode_fn=world.decode_fn,
                                             reward_fns=world.rewards, feature_fn=world.feature_fn,
                                             latent_shape=tuple(world.latent_shape)))
    update = make_policy_update(cfg, velocity_fn=world.velocity_fn, optimizer=optax.sgd(a.lr))

    @jax.jit
    def step(params, ro, ts):
        new, _, _, _ = update(params, optax.sgd(a.lr).init(params), jnp.zeros((), jnp.int32), lambda q: q, ro, ts)
        return new

    held_out = world.encode(digits.prompt_set("eval"))
    cond = held_out.rows(np.arange(len(held_out)))["cond"]
    noise = jax.random.normal(jax.random.PRNGKey(123), (len(held_out),) + tuple(world.latent_shape))
    sample = jax.jit(make_sampler(world.velocity_fn, world.decode_fn, c.sampling.num_steps, c.sampling.shift))

    def regions(params):
        imgs = sample(params, world.frozen, cond, noise)
        return float(jnp.mean(subject_redness(imgs))), float(jnp.mean(background_redness(imgs)))

    base_sub, base_bg = regions(world.params)
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
    rows = {k: [] for k in CREDITS}
    loader = world.prompt_loader(a.prompts, seed=0)
    for b in range(a.batches):
        batch = world.batch(loader.next())
        k = jax.random.split(jax.random.PRNGKey(1000 + b), 3)
        ro = rollout(world.params, world.frozen, batch, k[0], k[1])
        fg = latent_subject(ro["images"], grid)
        maps = {"all (GRPO)": jnp.ones_like(fg), "digit cells only": fg, "background cells only": 1.0 - fg,
                "PSM map (ViPO)": ro["map"], "1 - map (inverted)": 1.0 - ro["map"]}
        ts = rl.sample_train_timesteps(k[2], ro["latents"].shape[1], cfg.num_steps, cfg.timestep_fraction)
        deltas = {}
        for name in CREDITS:
            new = step(world.params, {**ro, "map": maps[name]}, ts)
            deltas[name] = flat(new) - flat(world.params)
            sub, bg = regions(new)
            rows[name].append((sub - base_sub, bg - base_bg))
        for name in CREDITS:
            cos = float(jnp.vdot(deltas[name], deltas["all (GRPO)"])
                        / (jnp.linalg.norm(deltas[name]) * jnp.linalg.norm(deltas["all (GRPO)"]) + 1e-30))
            rows[name][-1] += (cos,)
        print(f"batch {b + 1}/{a.batches} done", file=sys.stderr)

    print(f"reward {a.reward}; {a.batches} batches of {a.prompts} prompts x G {cfg.group_size}; one SGD step "
          f"(lr {a.lr}); redness of the 54 held-out prompts' ODE samples before the step: digit {base_sub:.4f}, "
          f"background {base_bg:.4f}\n")
    print("| credit at | Δ digit redness | Δ background redness | digit / background | cos with GRPO's step |")
    print("|---|---|---|---|---|")
    for name in CREDITS:
        r = np.asarray(rows[name])
        m, se = r.mean(0), r.std(0, ddof=1) / np.sqrt(len(r)) if len(r) > 1 else np.zeros(3)
        ratio = m[0] / m[1] if abs(m[1]) > 1e-12 else float("nan")
        print(f"| {name} | {m[0]:+.5f} ± {se[0]:.5f} | {m[1]:+.5f} ± {se[1]:.5f} | {ratio:.2f} | {m[2]:.3f} |")


if __name__ == "__main__":
    main()
