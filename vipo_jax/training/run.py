"""The training loop around the jitted step: data, logging, evaluation grids, checkpoints,
SIGTERM handling and the non-finite guard. Model-specific wiring lives in a ``World``
(``vipo_jax.worlds``), so the same loop runs Flux and Wan, toy and real."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vipo_jax.errors import VipoError
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.logging import MetricsWriter, image_grid, plot_curves, read_metrics, save_png
from vipo_jax.training.step import make_sampler, make_train_step


class NonFiniteError(VipoError, RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def make_optimizer(c: mlc.ConfigDict) -> optax.GradientTransformation:
    o = c.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "nonfinite": jnp.zeros((), jnp.int32)}


class _Stop:
    """SIGTERM / SIGINT -> finish the current iteration, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def train(c: mlc.ConfigDict, workdir: str | Path, world: Any = None, *, progress: bool = True) -> dict:
    """Run (or resume) training in ``workdir``; returns a summary dict (also written to summary.json)."""
    from vipo_jax.training.validate import validate
    from vipo_jax.worlds import build_world

    validate(c)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=1))
    world = world or build_world(c)
    optimizer = make_optimizer(c)
    graphdef, params = nnx.split(world.policy)
    # The step donates its state: give it its own buffers so the world's policy stays usable.
    state = init_state(jax.tree.map(jnp.copy, params), optimizer, c.seed)
    ckpt = RunCheckpointer(workdir, keep=c.log.keep_checkpoints)
    loader = world.prompt_loader(c)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        loader.restore(meta["loader"])
        start = int(meta["iteration"])
        print(f"resumed from {ckpt.dir} at iteration {start}")

    step_fn = make_train_step(world.step_config, velocity_fn=world.velocity_fn, decode_fn=world.decode_fn,
                              reward_fns=world.reward_fns, feature_fn=world.feature_fn,
                              optimizer=optimizer, latent_shape=world.latent_shape)
    step_fn = jax.jit(step_fn, donate_argnums=0)
    sampler = jax.jit(make_sampler(world.velocity_fn, world.decode_fn, c.sampling.num_steps, c.sampling.shift))
    eval_cond, eval_noise, eval_prompts = world.eval_inputs(c)
    writer = MetricsWriter(workdir, tensorboard=c.log.tensorboard)
    (workdir / "samples").mkdir(exist_ok=True)

    def evaluate(it: int, params) -> dict:
        imgs = np.asarray(sampler(params, world.frozen, eval_cond, eval_noise))
        np.save(workdir / "samples" / f"eval_{it:06d}.npy", imgs)
        base = workdir / "samples" / f"eval_{0:06d}.npy"
        row = [np.load(base)] if base.exists() and it > 0 else []
        save_png(workdir / "samples" / f"eval_{it:06d}.png",
                 image_grid(np.concatenate(row + [imgs]), cols=len(imgs)), scale=world.png_scale)
        return world.eval_metrics(imgs, eval_prompts)

    summary: dict = {}
    t_last = time.perf_counter()
    with _Stop() as stop:
        if start == 0 and c.log.eval_every:
            writer.write(0, {f"eval/{k}": v for k, v in evaluate(0, state["params"]).items()})
        bar = tqdm(range(start, c.train.iterations), initial=start, total=c.train.iterations,
                   disable=not progress, desc="vipo", dynamic_ncols=True)
        it = start
        for it in bar:
            batch = world.batch(loader.next())
            state, metrics = step_fn(state, world.frozen, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            metrics["time/step_s"] = now - t_last
            t_last = now
            done = it + 1
            if metrics["updates_skipped"] > 0:
                tqdm.write(f"iteration {done}: skipped {int(metrics['updates_skipped'])} update(s) with a "
                           f"non-finite loss or gradient (streak {int(metrics['nonfinite_streak'])})")
            if done % c.log.every == 0:
                writer.write(done, metrics)
            main = world.main_reward
            bar.set_postfix({"reward": f"{metrics[f'reward/{main}']:.4f}",
                             "loss": f"{metrics['loss']:.2e}", "s/it": f"{metrics['time/step_s']:.2f}"})
            if metrics["nonfinite_streak"] >= c.train.max_nonfinite:
                ckpt.save(done, state, {"iteration": done, "loader": loader.state()})
                raise NonFiniteError(
                    f"{int(metrics['nonfinite_streak'])} consecutive updates had a non-finite loss or gradient "
                    f"(iteration {done}); the parameters are unchanged since the last finite update and were "
                    f"checkpointed in {ckpt.dir}. Lower --config.optim.lr or check the reward.")
            if c.log.eval_every and done % c.log.eval_every == 0 and done < c.train.iterations:
                writer.write(done, {f"eval/{k}": v for k, v in evaluate(done, state["params"]).items()})
            if (c.log.ckpt_every and done % c.log.ckpt_every == 0) or stop.requested:
                ckpt.save(done, state, {"iteration": done, "loader": loader.state()})
            if stop.requested:
                tqdm.write(f"stop requested: checkpoint written at iteration {done} in {ckpt.dir}")
                summary["stopped_early"] = True
                break
        bar.close()
    final = int(jax.device_get(state["step"]))
    if not summary.get("stopped_early"):
        if ckpt.latest_step() != final:
            ckpt.save(final, state, {"iteration": final, "loader": loader.state()})
        if c.log.eval_every:
            writer.write(final, {f"eval/{k}": v for k, v in evaluate(final, state["params"]).items()})
    writer.close()
    ckpt.close()
    records = read_metrics(workdir / "metrics.jsonl")
    rkeys = [f"reward/{n}" for n, _ in world.step_config.rewards]
    plot_curves(records, rkeys + ["loss", "map/mean"], workdir / "reward_curve.png", title=str(workdir.name))
    summary.update(_summarise(records, rkeys))
    summary["iterations"] = final
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "state": state}


def _summarise(records: list[dict], keys: list[str]) -> dict:
    out = {}
    train_recs = [r for r in records if any(r.get(k) is not None for k in keys)]
    n = len(train_recs)
    if n:
        m = max(1, n // 10)
        for k in keys:
            vals = [r[k] for r in train_recs if r.get(k) is not None]
            out[f"{k}/first10pct"] = float(np.mean(vals[:m]))
            out[f"{k}/last10pct"] = float(np.mean(vals[-m:]))
    return out
