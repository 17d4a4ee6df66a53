"""Evaluate policies on held-out prompts: deterministic ODE samples from fixed noises (the same
noise for every checkpoint, so differences are the checkpoints'), scored by every metric the
world has, written as JSON, Markdown and HTML with image grids."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vipo_jax.errors import CheckpointError, DataError
from vipo_jax.evaluation.checkpoints import CheckpointSpec, restore_params, unique_labels
from vipo_jax.evaluation.report import group_stats, safe_name, save_grids, write_reports
from vipo_jax.nn.lora import LoraConfig
from vipo_jax.training.ema import ema_decay
from vipo_jax.training.lora import initial_adapters, lora_config, merged_params
from vipo_jax.training.run_dir import run_config
from vipo_jax.training.step import make_sampler
from vipo_jax.training.step_config import psm_options
from vipo_jax.worlds import World, build_world

EVAL_NOISE_SEED = 9876


def eval_noise(seed: int, num_prompts: int, latent_shape: tuple[int, ...]) -> jax.Array:
    """One initial noise per (seed, prompt), independent of the batch size used to sample."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(EVAL_NOISE_SEED + seed), i))(
        jnp.arange(num_prompts))
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys)


def _summary(values: np.ndarray, per_seed: np.ndarray) -> dict:
    n = values.size
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if n > 1 else 0.0,
            "sem": float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0, "n": int(n),
            "seed_means": [float(v) for v in per_seed]}


def checkpoint_params(spec: CheckpointSpec, policy: nnx.Module, base_params: Any) -> tuple[Any, int, dict]:
    """The full policy state a checkpoint stands for, shaped like ``base_params``: the run's
    params or EMA; for a LoRA run (per its ``config.json``) the adapters merged into the base
    weights. Returns it, the step and what it is (``{"weights", "lora_rank"}``)."""
    has_config = (Path(spec.path) / "config.json").is_file()
    run_c = run_config(spec.path) if has_config else None
    if spec.ema and run_c is not None and ema_decay(run_c) <= 0:
        raise CheckpointError(f"{spec.path} was trained without an EMA (train.ema_decay=0): evaluate it without "
                              "--use_ema")
    key = "ema" if spec.ema else "params"
    lora = lora_config(run_c) if run_c is not None else LoraConfig()
    if lora.enabled:
        trained, step = restore_params(spec, initial_adapters(policy, lora), key=key)
        return merged_params(policy, lora, trained), step, {"weights": key, "lora_rank": lora.rank}
    params, step = restore_params(spec, base_params, key=key)
    return params, step, {"weights": key, "lora_rank": 0}


def evaluate(c: mlc.ConfigDict, checkpoints: list[CheckpointSpec], prompts: list[str], seeds: list[int],
             out: str | Path, *, batch_size: int = 16, grid_prompts: int = 8, world: World | None = None,
             progress: bool = True) -> dict:
    """Sample ``prompts`` × ``seeds`` with each checkpoint, score with every metric of the world, and
    write ``results.json``, ``report.md``, ``report.html`` and grids into ``out``. Returns the
    results dict. ``world``: built by ``build_world(c, evaluation=True)`` when not given."""
    if not prompts:
        raise DataError("no evaluation prompts")
    if not checkpoints:
        raise DataError("nothing to evaluate: give at least one --checkpoint (or 'base')")
    checkpoints = unique_labels(checkpoints)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = world or build_world(c, evaluation=True)
    if world.encode is None:
        raise DataError(f"a world of {world.source} weights cannot encode new prompts for evaluation")
    table = world.encode(list(prompts))
    base_params = world.params
    policy = world.policy()
    sampler = jax.jit(make_sampler(world.velocity_fn, world.decode_fn, c.sampling.num_steps, c.sampling.shift,
                                   return_latents=True))
    psm_opts = psm_options(c.psm) if c.psm.enabled and world.has_backbone else None
    map_fn = None if psm_opts is None else jax.jit(lambda fr, s, x0: world.psm_maps(fr, s, x0, psm_opts))
    metric_fns = world.metrics
    score = jax.jit(lambda frozen, images, batch: {k: f(frozen, images, batch) for k, f in metric_fns.items()})
    n, bs = len(prompts), max(1, min(batch_size, len(prompts)))
    in_domain = [name for name, _ in world.reward_weights]

    results: dict = {"prompts": list(prompts), "seeds": list(seeds), "in_domain": in_domain,
                     "metrics": sorted(metric_fns), "sampling": {"num_steps": c.sampling.num_steps,
                                                               "shift": c.sampling.shift, "eta": 0.0},
                     "checkpoints": {}}
    samples: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] = {}
    total = len(checkpoints) * len(seeds) * (-(-n // bs))
    bar = tqdm(total=total, desc="evaluate", disable=not progress, dynamic_ncols=True)
    for spec in checkpoints:
        t0 = time.perf_counter()
        if spec.path is None:
            params, step, what = base_params, 0, {"weights": "base", "lora_rank": 0}
        else:
            params, step, what = checkpoint_params(spec, policy, base_params)
        per_metric: dict[str, list[np.ndarray]] = {k: [] for k in metric_fns}
        images_seed0, maps_seed0 = None, None
        for seed in seeds:
            noise = eval_noise(seed, n, tuple(world.latent_shape))
            vals: dict[str, list[np.ndarray]] = {k: [] for k in metric_fns}
            imgs_all, maps_all = [], []
            for start in range(0, n, bs):
                idx = np.arange(start, start + bs) % n  # pad the last batch by wrapping (one compile)
                batch = table.rows(idx)
                imgs, x0 = sampler(params, world.frozen, batch["cond"], noise[idx])
                scores = jax.device_get(score(world.frozen, imgs, batch))
                keep = min(bs, n - start)
                for k, v in scores.items():
                    vals[k].append(np.asarray(v, np.float64)[:keep])
                if seed == seeds[0]:
                    imgs_all.append(np.asarray(imgs)[:keep])
                    if map_fn is not None and start < grid_prompts:
                        maps_all.append(np.asarray(map_fn(world.frozen, imgs, x0))[:keep])
                bar.update(1)
            for k in metric_fns:
                per_metric[k].append(np.concatenate(vals[k]))
            if seed == seeds[0]:
                images_seed0 = np.concatenate(imgs_all)
                maps_seed0 = np.concatenate(maps_all) if maps_all else None
        samples[spec.label] = images_seed0
        if maps_seed0 is not None:
            maps[spec.label] = maps_seed0
            np.save(out / f"maps_{safe_name(spec.label)}.npy", maps_seed0)
        stats = {k: _summary(np.stack(v), np.stack(v).mean(axis=1)) for k, v in per_metric.items()}
        per_prompt = {k: np.stack(v).mean(axis=0).round(6).tolist() for k, v in per_metric.items()}
        results["checkpoints"][spec.label] = {"path": spec.path, "group": spec.group, "step": step, **what,
                                              "metrics": stats,
                                              "per_prompt": per_prompt,
                                              "seconds": round(time.perf_counter() - t0, 2)}
        np.save(out / f"samples_{safe_name(spec.label)}.npy", images_seed0)
    bar.close()
    results["groups"] = group_stats(results)
    save_grids(out, samples, prompts, grid_prompts, maps)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_reports(out, results, grid_prompts)
    return results
