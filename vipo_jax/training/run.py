"""The training loop around the jitted step: data, logging, evaluation grids, checkpoints,
SIGTERM handling and the non-finite guard. Model-specific wiring lives in a ``World``
(``vipo_jax.worlds``), so the same loop runs Flux and Wan, toy and real.

The run directory (``training.run_dir``): nothing is written into ``workdir`` before the config is
checked, the world built and the workdir's own run (if any) found to be trained with the same config
(or ``resume_anyway``); ``config.json`` is written once per run. A state with a non-finite value is
never checkpointed; on resume ``metrics.jsonl`` is cut back to the restored step, and an unreadable
latest checkpoint falls back to the newest intact one.

LoRA and EMA (``config.lora``, ``config.train.ema_decay``; ``training.lora``, ``training.ema``): with
LoRA the train state's ``params`` are the adapters only and the base weights join the frozen tree;
with EMA the state also holds ``ema``. The step is compiled ahead of time (``lower().compile()``) before the
first iteration, with its compile time and per-device memory printed and kept in summary.json.

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
from tqdm.auto import tqdm

from vipo_jax import sharding as shd
from vipo_jax.errors import VipoError
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.checks import check_config
from vipo_jax.training.ema import as_params_dtype, ema_decay, init_ema
from vipo_jax.training.lora import lora_config
from vipo_jax.training.metrics_log import MetricsWriter, read_metrics, truncate_metrics
from vipo_jax.training.optim import make_optimizer
from vipo_jax.training.run_dir import check_resume, check_workdir, checkpoint_steps, record_resume, write_config
from vipo_jax.training.step import jit_train_step, make_sampler, train_step_for
from vipo_jax.training.step_config import StepConfig
from vipo_jax.training.throughput import phase_report, profile_phases
from vipo_jax.utils.malloc import limit_malloc_arenas
from vipo_jax.utils.media import heat_overlay, plot_curves, save_samples
from vipo_jax.worlds import BASE_KEY, World, build_world


class NonFiniteError(VipoError, RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, ema: bool = False) -> dict:
    """The train state of ``params`` (the trained parameters: the adapters under LoRA); ``ema``: with
    a float32 moving average of them (``train.ema_decay > 0``)."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(seed), "nonfinite": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema"] = init_ema(params)
    return state


def init_sharded_state(params: Any, optimizer: optax.GradientTransformation, seed: int, rules: shd.Rules,
                       mesh: jax.sharding.Mesh, ema: bool = False) -> tuple[dict, Any]:
    """The train state on ``mesh`` (its own copy of ``params``; optimizer moments and the EMA split
    like the parameters they belong to) and its shardings, for ``jit_train_step`` and checkpoint restore."""
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, seed, ema), params)
    shardings = shd.param_shardings(abstract, rules, mesh)
    # The step donates its state: give it its own buffers so the caller's parameters stay usable.
    params = jax.tree.map(jnp.copy, shd.place(params, shardings["params"]))
    state = {"params": params,
             "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)}
    if ema:
        state["ema"] = shd.place(init_ema(params), shardings["ema"])
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


def train(c: mlc.ConfigDict, workdir: str | Path, world: World | None = None, *, progress: bool = True,
          mesh: jax.sharding.Mesh | None = None, compile_only: bool = False, resume_anyway: bool = False) -> dict:
    """Run (or resume) training in ``workdir``; returns a summary dict (also written to summary.json).

    The mesh comes from ``c.mesh`` unless ``mesh`` is given, the sharding rules from
    ``c.sharding``. A ``world`` given by the caller (built with ``build_world``) may hold unplaced
    models: the loop places a copy of it (the caller's world is not changed, so tests reuse one).

    ``compile_only``: build the world and the state, compile the train step, report its compile time
    and per-device memory, and return that (nothing is written to ``workdir``, no step runs).

    A ``workdir`` holding a checkpoint of a run whose ``config.json`` differs from ``c`` in a key
    that changes training (``run_dir.RESUMABLE_KEYS`` may differ) is refused (WorkdirError, the keys
    listed) unless ``resume_anyway``, which records the resume in ``resumes.jsonl``."""
    limit_malloc_arenas()  # before the world and checkpointer start threads: saves ratchet RSS (utils/malloc.py)
    step_cfg = check_config(c, files=True)
    workdir, diffs = Path(workdir), []
    if not compile_only:  # before anything is built: a bad workdir or another run's workdir fails at once
        check_workdir(workdir)
        diffs = check_resume(workdir, c, resume_anyway=resume_anyway)
    mesh = mesh or shd.make_mesh(c.get("mesh"))
    rules = shd.rules_from_config(c)
    with shd.activate(mesh, rules):
        return _train(c, step_cfg, workdir, world, progress, mesh, rules, compile_only, diffs)


GiB = 1024**3


def memory_stats(compiled: Any) -> dict[str, float]:
    """Per-device memory of a compiled executable from XLA (``memory_analysis``), in GiB; ``{}`` where
    the backend does not report it. ``peak_gib`` is arguments + temporaries + outputs - aliased
    (donated) bytes, as ``vipo_jax.plan`` reports it; ``xla_peak_gib`` is XLA's own figure where given."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend / jax version implements it
        mem = None
    if mem is None:
        return {}
    out = {f"memory/{k}_gib": getattr(mem, f"{k}_size_in_bytes", 0) / GiB
           for k in ("argument", "temp", "output", "alias", "generated_code")}
    out["memory/peak_gib"] = (out["memory/argument_gib"] + out["memory/temp_gib"] + out["memory/output_gib"]
                              - out["memory/alias_gib"])
    xla_peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    if xla_peak > 0:
        out["memory/xla_peak_gib"] = xla_peak / GiB
    return out


_CACHE_HITS = {"n": 0, "listening": False}


def _count_cache_hits() -> int:
    """Persistent-compilation-cache hits so far in this process (a jax.monitoring listener, registered once)."""
    if not _CACHE_HITS["listening"]:
        def on_event(event: str, **kwargs: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _CACHE_HITS["n"] += 1

        jax.monitoring.register_event_listener(on_event)
        _CACHE_HITS["listening"] = True
    return _CACHE_HITS["n"]


def compile_step(step: Any, state: dict, frozen: Any, batch: Any, *, state_shardings: Any, frozen_shardings: Any,
                 mesh: jax.sharding.Mesh) -> tuple[Any, dict[str, float]]:
    """Compile the train step ahead of time (``jit(...).lower(...).compile()``) for these inputs'
    shapes and shardings, so the compile happens (and is timed and its memory reported) before the
    first iteration rather than inside it. With the persistent compilation cache on
    (``utils.compile_cache``), a restart finds the executable there. Returns the compiled step and
    ``{"time/compile_s", "compile/cache_hit", "memory/*_gib"}`` (cache_hit: 1.0 when XLA's
    executable came from the persistent cache)."""
    jitted = jit_train_step(step, state_shardings=state_shardings, frozen_shardings=frozen_shardings,
                            batch_shardings=jax.tree.map(lambda a: a.sharding, batch), mesh=mesh)
    hits = _count_cache_hits()
    t0 = time.perf_counter()
    compiled = jitted.lower(state, frozen, batch).compile()
    dt = time.perf_counter() - t0
    return compiled, {"time/compile_s": dt, "compile/cache_hit": float(_count_cache_hits() > hits),
                      **memory_stats(compiled)}


def compile_report(info: dict[str, float]) -> str:
    """One line for the console: compile time and per-device memory."""
    line = f"train step compiled in {info['time/compile_s']:.1f} s"
    if info.get("compile/cache_hit"):
        line += " (executable from the persistent compilation cache)"
    if "memory/peak_gib" in info:
        line += (f"; per-device memory: arguments {info['memory/argument_gib']:.3f} GiB, temporaries "
                 f"{info['memory/temp_gib']:.3f} GiB, outputs {info['memory/output_gib']:.3f} GiB, donated "
                 f"{info['memory/alias_gib']:.3f} GiB, peak {info['memory/peak_gib']:.3f} GiB")
    else:
        line += "; per-device memory: not reported by this backend"
    return line


def _num(tree: Any) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _train(c: mlc.ConfigDict, step_cfg: StepConfig, workdir: Path, world: World | None, progress: bool,
           mesh: jax.sharding.Mesh, rules: shd.Rules, compile_only: bool = False,
           diffs: list[tuple] | None = None) -> dict:
    main = shd.is_main_process()
    world = world or build_world(c, sharding=shd.LogicalSharding(rules, mesh))
    optimizer = make_optimizer(c)
    lora, decay = lora_config(c), ema_decay(c)
    forward_flops = world.family.forward_flops(c, world.policy())  # one policy forward, one sample
    params = world.params  # the trained params: the policy's full state, or under LoRA its adapters
    if lora.enabled:
        world, params, paths = world.with_lora(lora, c.seed)
        if main:
            n, total = _num(params), _num(params) + _num(world.frozen[BASE_KEY])
            print(f"LoRA rank {lora.rank} (scale {lora.scale:g}) on {len(paths)} layers: {n:,} trained "
                  f"parameters of {total:,} ({100 * n / total:.2f}%)")
    state, state_sh = init_sharded_state(params, optimizer, c.seed, rules, mesh, ema=decay > 0)
    frozen_sh = shd.param_shardings(world.frozen, rules, mesh)
    world = world.placed(shd.place(world.frozen, frozen_sh))
    step = train_step_for(world, step_cfg, optimizer, ema_decay=decay)
    policy_params = world.full_params if lora.enabled else None
    loader = world.prompt_loader(c.sampling.prompts_per_iter, c.seed)

    def next_batch():
        return shd.global_batch(world.batch(loader.next()), mesh, rules)

    def compile_for(batch) -> tuple[Any, dict]:
        fn, info = compile_step(step, state, world.frozen, batch, state_shardings=state_sh,
                                frozen_shardings=frozen_sh, mesh=mesh)
        if main:
            print(compile_report(info), flush=True)
        return fn, info

    if compile_only:
        return compile_for(next_batch())[1]

    # Everything is checked and built: the first write into the workdir. config.json once per run:
    # a workdir with a checkpoint keeps the one its steps were trained with.
    if main and (not checkpoint_steps(workdir) or not (workdir / "config.json").is_file()):
        write_config(workdir, c)
    ckpt = RunCheckpointer(workdir, keep=c.log.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta, restored, unreadable = ckpt.restore_latest(state)
        loader.restore(meta["loader"])
        start = int(meta["iteration"])
        if main:
            for bad, why in unreadable:
                print(f"checkpoint step {bad} in {ckpt.dir} is unreadable ({why}); moved to "
                      f"{workdir / 'checkpoints_corrupt'}; resuming from the previous one, step {restored}", flush=True)
            print(f"resumed from {ckpt.dir} at iteration {start}")
            if diffs:
                record_resume(workdir, start, diffs)
                print(f"--resume_anyway: {len(diffs)} differing config key(s) recorded in {workdir / 'resumes.jsonl'}")
    if main:  # iterations redone after a crash between their metrics line and their checkpoint: no duplicates
        dropped = truncate_metrics(workdir / "metrics.jsonl", start)
        if dropped and start:
            print(f"metrics.jsonl: dropped {dropped} line(s) after iteration {start}, the restored checkpoint")

    summary: dict = {}
    step_fn, pending, profile = None, None, None
    if start < c.train.iterations:
        # The first batch fixes the batch shardings; it is the first iteration's batch.
        pending = next_batch()
        step_fn, info = compile_for(pending)
        summary.update(info)
        if c.log.get("phase_times", True):  # each phase jitted alone once: times, FLOPs, MFU
            full = world.full_params(state["params"], world.frozen) if lora.enabled else state["params"]
            profile = profile_phases(world, step_cfg, full, world.frozen, pending, micro_batch=c.train.micro_batch,
                                     remat=c.model.remat, forward_flops=forward_flops)
            if main:
                print(f"phases timed; MFU against the {profile['_peak_source']} "
                      f"({profile['phase/peak_tflops']:.3g} TFLOP/s)", flush=True)
    step_times: list[float] = []
    rep = shd.replicated(mesh)
    sampler = jax.jit(make_sampler(world.velocity_fn, world.decode_fn, c.sampling.num_steps, c.sampling.shift,
                                   policy_params=policy_params, return_latents=True),
                      in_shardings=(state_sh["params"], frozen_sh, rep, rep), out_shardings=rep)
    # the evaluation grids show the PSM's maps under the samples (the map itself, whatever the control)
    map_fn = None
    if step_cfg.psm is not None and world.has_backbone:
        opts = step_cfg.psm
        map_fn = jax.jit(lambda fr, s, x0: world.psm_maps(fr, s, x0, opts), out_shardings=rep)
    use_ema = decay > 0 and bool(c.log.get("eval_ema", True))

    def eval_params(state: dict) -> Any:
        """The weights the evaluation grids and metrics show: the EMA (in the params' dtypes) or the params."""
        return as_params_dtype(state["ema"], state["params"]) if use_ema else state["params"]

    eval_cond, eval_noise, eval_prompts = world.eval_inputs()
    eval_cond, eval_noise = shd.place((eval_cond, eval_noise), jax.tree.map(lambda _: rep, (eval_cond, eval_noise)))
    writer = MetricsWriter(workdir, tensorboard=c.log.tensorboard) if main else _NullWriter()
    if main:
        (workdir / "samples").mkdir(exist_ok=True)

    def evaluate(it: int, params) -> dict:
        imgs_d, x0 = sampler(params, world.frozen, eval_cond, eval_noise)
        maps = shd.fetch(map_fn(world.frozen, imgs_d, x0)) if map_fn is not None else None
        imgs = shd.fetch(imgs_d)
        metrics = world.eval_metrics(imgs)
        if main:
            np.save(workdir / "samples" / f"eval_{it:06d}.npy", imgs)
            base = workdir / "samples" / f"eval_{0:06d}.npy"
            rows = ([np.load(base)] if base.exists() and it > 0 else []) + [imgs]
            if maps is not None:  # a third row: the maps over the samples
                np.save(workdir / "samples" / f"maps_{it:06d}.npy", maps)
                rows.append(heat_overlay(imgs, maps))
            save_samples(workdir / "samples" / f"eval_{it:06d}", np.concatenate(rows), cols=len(imgs),
                         scale=world.options.png_scale, fps=world.options.fps)  # .png, or .gif for videos
        return metrics

    def save(done: int) -> None:
        ckpt.save(done, state, {"iteration": done, "loader": loader.state()})

    t_last = time.perf_counter()
    with _Stop() as stop:
        if start == 0 and c.log.eval_every:
            writer.write(0, {f"eval/{k}": v for k, v in evaluate(0, eval_params(state)).items()})
        bar = tqdm(range(start, c.train.iterations), initial=start, total=c.train.iterations,
                   disable=not (progress and main), desc="vipo", dynamic_ncols=True)
        it = start
        for it in bar:
            batch, pending = (pending if pending is not None else next_batch()), None
            state, metrics = step_fn(state, world.frozen, batch)
            metrics = {k: float(v) for k, v in shd.fetch(metrics).items()}
            now = time.perf_counter()
            metrics["time/step_s"] = now - t_last
            t_last = now
            step_times.append(metrics["time/step_s"])
            if profile is not None:
                total = sum(v for k, v in profile.items() if k.endswith("_tflop") and "recompute" not in k)
                metrics["throughput/mfu"] = total / metrics["time/step_s"] / profile["phase/peak_tflops"]
            done = it + 1
            if metrics["updates_skipped"] > 0 and main:
                tqdm.write(f"iteration {done}: skipped {int(metrics['updates_skipped'])} update(s) with a "
                           f"non-finite loss, gradient or update (streak {int(metrics['nonfinite_streak'])})")
            if done % c.log.every == 0:
                writer.write(done, metrics)
            main_reward = world.main_reward
            bar.set_postfix({"reward": f"{metrics[f'reward/{main_reward}']:.4f}",
                             "loss": f"{metrics['loss']:.2e}", "s/it": f"{metrics['time/step_s']:.2f}"})
            if metrics["nonfinite_streak"] >= c.train.max_nonfinite:
                save(done)
                raise NonFiniteError(
                    f"{int(metrics['nonfinite_streak'])} consecutive updates had a non-finite loss, gradient or update "
                    f"(iteration {done}); the parameters are unchanged since the last finite update and were "
                    f"checkpointed in {ckpt.dir}. Lower --config.optim.lr or check the reward.")
            if c.log.eval_every and done % c.log.eval_every == 0 and done < c.train.iterations:
                writer.write(done, {f"eval/{k}": v for k, v in evaluate(done, eval_params(state)).items()})
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
    if profile is not None and step_times:  # the first iteration's time holds a warm-up
        typical = float(np.median(step_times[1:] if len(step_times) > 1 else step_times))
        phases = phase_report(profile, typical)
        summary.update(phases)
        summary["phase/peak_source"] = profile["_peak_source"]
        writer.write(final, phases)
    if not summary.get("stopped_early"):
        if ckpt.latest_step() != final:
            save(final)
        if c.log.eval_every:
            writer.write(final, {f"eval/{k}": v for k, v in evaluate(final, eval_params(state)).items()})
    writer.close()
    ckpt.close()
    summary["iterations"] = final
    if main:
        records = read_metrics(workdir / "metrics.jsonl")
        rkeys = [f"reward/{n}" for n, _ in world.reward_weights]
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
    # the first and the final evaluation of the fixed prompts (half of them held out in the toy world)
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evals:
        out["eval/first_step"], out["eval/final_step"] = int(evals[0]["step"]), int(evals[-1]["step"])
        for k, v in evals[-1].items():
            if k.startswith("eval/") and isinstance(v, int | float):
                if isinstance(evals[0].get(k), int | float):
                    out[f"{k}/first"] = float(evals[0][k])
                out[f"{k}/final"] = float(v)
    return out


#: Evaluation metrics the end-of-run line shows besides the trained rewards: does the subject survive?
SURVIVAL_METRICS = ("digit_accuracy", "digit_accuracy_eval", "color_match")


def result_line(summary: dict) -> str:
    """The run's result in one line: each trained reward's first -> last 10% of iterations, and the
    first -> final evaluation of the trained rewards and of what says whether the subject survives."""
    trained = [k[len("reward/"):-len("/first10pct")] for k in summary
               if k.startswith("reward/") and k.endswith("/first10pct")]
    parts = [f"{n} {summary[f'reward/{n}/first10pct']:.3f} -> {summary[f'reward/{n}/last10pct']:.3f} "
             "(training batches, first -> last 10%)" for n in trained]
    shown = [n for n in (*trained, *SURVIVAL_METRICS) if f"eval/{n}/final" in summary and f"eval/{n}/first" in summary]
    if shown:
        steps = f"iteration {summary['eval/first_step']} -> {summary['eval/final_step']}"
        parts.append(f"evaluation prompts ({steps}): " + ", ".join(
            f"{n} {summary[f'eval/{n}/first']:.3f} -> {summary[f'eval/{n}/final']:.3f}" for n in shown))
    return "; ".join(parts)
