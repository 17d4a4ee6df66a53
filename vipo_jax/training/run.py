"""The training loop around the jitted step: data, logging, evaluation grids, checkpoints,
SIGTERM handling and the non-finite guard. Model-specific wiring lives in a ``World``
(``vipo_jax.worlds``), so the same loop runs Flux and Wan, toy and real.

Sharding: the loop builds the mesh (``config.mesh``) and rules (``config.sharding.rules``), places
the world's policy (train state: params and optimizer state) and frozen models by those rules,
assembles each iteration's global batch from this process's prompts, and runs every step inside
``jax.set_mesh``. With several processes all of them run this loop; only process 0 writes logs,
plots, sample grids and the summary (orbax checkpoints are written by all of them together).
"""

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

from vipo_jax import sharding as shd
from vipo_jax.errors import VipoError
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.logging import MetricsWriter, plot_curves, read_metrics, save_samples
from vipo_jax.training.step import jit_train_step, make_sampler, make_train_step


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


def init_sharded_state(params: Any, optimizer: optax.GradientTransformation, seed: int, rules: shd.Rules,
                       mesh: jax.sharding.Mesh) -> tuple[dict, Any]:
    """The train state on ``mesh`` (its own copy of ``params``; optimizer moments split like the
    parameters they belong to) and its shardings, for ``jit_train_step`` and checkpoint restore."""
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, seed), params)
    shardings = shd.param_shardings(abstract, rules, mesh)
    # The step donates its state: give it its own buffers so the caller's parameters stay usable.
    params = jax.tree.map(jnp.copy, shd.place(params, shardings["params"]))
    state = {"params": params,
             "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)}
    rest = {k: v for k, v in abstract.items() if k not in state}
    small = init_state({}, optimizer, seed)  # step, rng, counters: replicated scalars
    state.update(shd.place({k: small[k] for k in rest}, {k: shardings[k] for k in rest}))
    return state, shardings


class _NullWriter:
    """Metrics sink of processes other than 0."""

    def write(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


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


def train(c: mlc.ConfigDict, workdir: str | Path, world: Any = None, *, progress: bool = True,
          mesh: jax.sharding.Mesh | None = None) -> dict:
    """Run (or resume) training in ``workdir``; returns a summary dict (also written to summary.json).

    The mesh comes from ``c.mesh`` unless ``mesh`` is given, the sharding rules from
    ``c.sharding``. A ``world`` given by the caller may hold unplaced models: its policy and frozen
    trees are placed here (``world.frozen`` is replaced by the placed tree)."""
    from vipo_jax.training.validate import validate

    validate(c)
    mesh = mesh or shd.make_mesh(c.get("mesh"))
    rules = shd.rules_from_config(c)
    with shd.activate(mesh, rules):
        return _train(c, Path(workdir), world, progress, mesh, rules)


def _train(c: mlc.ConfigDict, workdir: Path, world: Any, progress: bool, mesh: jax.sharding.Mesh,
           rules: shd.Rules) -> dict:
    from vipo_jax.worlds import build_world

    main = shd.is_main_process()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=1))
    world = world or build_world(c, sharding=shd.LogicalSharding(rules, mesh))
    optimizer = make_optimizer(c)
    _, params = nnx.split(world.policy)
    state, state_sh = init_sharded_state(params, optimizer, c.seed, rules, mesh)
    frozen_sh = shd.param_shardings(world.frozen, rules, mesh)
    world.frozen = shd.place(world.frozen, frozen_sh)
    ckpt = RunCheckpointer(workdir, keep=c.log.keep_checkpoints)
    loader = world.prompt_loader(c)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        loader.restore(meta["loader"])
        start = int(meta["iteration"])
        if main:
            print(f"resumed from {ckpt.dir} at iteration {start}")

    def next_batch():
        return shd.global_batch(world.batch(loader.next()), mesh, rules)

    step = make_train_step(world.step_config, velocity_fn=world.velocity_fn, decode_fn=world.decode_fn,
                           reward_fns=world.reward_fns, feature_fn=world.feature_fn,
                           optimizer=optimizer, latent_shape=world.latent_shape)
    step_fn = None  # jitted on the first batch, whose shardings it takes
    rep = shd.replicated(mesh)
    sampler = jax.jit(make_sampler(world.velocity_fn, world.decode_fn, c.sampling.num_steps, c.sampling.shift),
                      in_shardings=(state_sh["params"], frozen_sh, rep, rep), out_shardings=rep)
    eval_cond, eval_noise, eval_prompts = world.eval_inputs(c)
    eval_cond, eval_noise = shd.place((eval_cond, eval_noise), jax.tree.map(lambda _: rep, (eval_cond, eval_noise)))
    writer = MetricsWriter(workdir, tensorboard=c.log.tensorboard) if main else _NullWriter()
    if main:
        (workdir / "samples").mkdir(exist_ok=True)

    def evaluate(it: int, params) -> dict:
        imgs = shd.fetch(sampler(params, world.frozen, eval_cond, eval_noise))
        metrics = world.eval_metrics(imgs, eval_prompts)
        if main:
            np.save(workdir / "samples" / f"eval_{it:06d}.npy", imgs)
            base = workdir / "samples" / f"eval_{0:06d}.npy"
            row = [np.load(base)] if base.exists() and it > 0 else []
            save_samples(workdir / "samples" / f"eval_{it:06d}", np.concatenate(row + [imgs]), cols=len(imgs),
                         scale=world.png_scale, fps=getattr(world, "fps", 8.0))  # .png, or .gif for videos
        return metrics

    def save(done: int) -> None:
        ckpt.save(done, state, {"iteration": done, "loader": loader.state()})

    summary: dict = {}
    t_last = time.perf_counter()
    with _Stop() as stop:
        if start == 0 and c.log.eval_every:
            writer.write(0, {f"eval/{k}": v for k, v in evaluate(0, state["params"]).items()})
        bar = tqdm(range(start, c.train.iterations), initial=start, total=c.train.iterations,
                   disable=not (progress and main), desc="vipo", dynamic_ncols=True)
        it = start
        for it in bar:
            batch = next_batch()
            if step_fn is None:
                step_fn = jit_train_step(step, state_shardings=state_sh, frozen_shardings=frozen_sh,
                                         batch_shardings=jax.tree.map(lambda a: a.sharding, batch), mesh=mesh)
            state, metrics = step_fn(state, world.frozen, batch)
            metrics = {k: float(v) for k, v in shd.fetch(metrics).items()}
            now = time.perf_counter()
            metrics["time/step_s"] = now - t_last
            t_last = now
            done = it + 1
            if metrics["updates_skipped"] > 0 and main:
                tqdm.write(f"iteration {done}: skipped {int(metrics['updates_skipped'])} update(s) with a "
                           f"non-finite loss or gradient (streak {int(metrics['nonfinite_streak'])})")
            if done % c.log.every == 0:
                writer.write(done, metrics)
            main_reward = world.main_reward
            bar.set_postfix({"reward": f"{metrics[f'reward/{main_reward}']:.4f}",
                             "loss": f"{metrics['loss']:.2e}", "s/it": f"{metrics['time/step_s']:.2f}"})
            if metrics["nonfinite_streak"] >= c.train.max_nonfinite:
                save(done)
                raise NonFiniteError(
                    f"{int(metrics['nonfinite_streak'])} consecutive updates had a non-finite loss or gradient "
                    f"(iteration {done}); the parameters are unchanged since the last finite update and were "
                    f"checkpointed in {ckpt.dir}. Lower --config.optim.lr or check the reward.")
            if c.log.eval_every and done % c.log.eval_every == 0 and done < c.train.iterations:
                writer.write(done, {f"eval/{k}": v for k, v in evaluate(done, state["params"]).items()})
            stopping = shd.any_process(stop.requested)  # every process stops at the same iteration
            if (c.log.ckpt_every and done % c.log.ckpt_every == 0) or stopping:
                save(done)
            if stopping:
                if main:
                    tqdm.write(f"stop requested: checkpoint written at iteration {done} in {ckpt.dir}")
                summary["stopped_early"] = True
                break
        bar.close()
    final = int(shd.fetch(state["step"]))
    if not summary.get("stopped_early"):
        if ckpt.latest_step() != final:
            save(final)
        if c.log.eval_every:
            writer.write(final, {f"eval/{k}": v for k, v in evaluate(final, state["params"]).items()})
    writer.close()
    ckpt.close()
    summary["iterations"] = final
    if main:
        records = read_metrics(workdir / "metrics.jsonl")
        rkeys = [f"reward/{n}" for n, _ in world.step_config.rewards]
        plot_curves(records, rkeys + ["loss", "map/mean"], workdir / "reward_curve.png", title=str(workdir.name))
        summary.update(_summarise(records, rkeys))
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
