"""Our jitted ViPO iteration against a PyTorch one organised like the reference scripts: parity, then speed.

    python benchmarks/vs_pytorch.py [--size bench|test] [--repeats 5] [--skip-speed | --skip-parity] [--threads 2,1]

Both sides run the same models: a tiny random diffusers FLUX.1 pipeline folder (``FluxTransformer2DModel``,
``AutoencoderKL``, CLIP and T5 text encoders, the toy tokenizers) and a transformers ``Dinov2Model``
folder, norm scales randomised, written by the reference libraries
(``pytorch_reference/reference_pipelines.py``). Ours is the pretrained world of ``configs/flux.py``
pointed at those folders (``build_world(c)`` with ``world="real"``, float32, the ``redness`` reward, the
sizes of ``--size``): our loaders, the prompt-embedding cache of a file of toy captions, and
``train_step_for(world, StepConfig.from_config(c), make_optimizer(c))``. The PyTorch iteration
(``pytorch_reference/torch_reference.py``: a loop over samples and sampling steps, DanceGRPO's
``flux_step``, per-sample decode / redness reward / PSM, group advantages, a separate forward +
``backward()`` per sample and trained timestep, one clipped AdamW step) runs the torch modules the
writers saved, on the world's own conditioning (its cached T5 states and pooled CLIP vectors).

Parity (``pytorch_reference/parity.py``, also ``tests/test_vs_pytorch.py`` at ``--size test``): the
PyTorch side is fed our initial noise, SDE noise, trajectory (each transition's log-prob is evaluated
on our ``x_t -> x_{t+1}``, as a training pass does) and trained timesteps; everything downstream (x0,
images, rewards, DINOv2 features, PSM maps, advantages, loss, gradients, parameters after AdamW) it
computes itself. The gradients of the jitted step are read back through an optax transformation that
keeps them in the optimizer state; PyTorch's are mapped into our parameter layout with our own
converter (a linear re-arrangement). Exit status 1 if a check fails.

Speed: one full iteration of each after warm-up (JAX compile time reported separately, no
persistent compilation cache unless ``--compile-cache``), minimum over ``--repeats`` interleaved
rounds, PyTorch at each ``--threads`` count (its OpenMP workers busy-wait, so on a loaded machine
the 1-thread number is the reliable one); per-phase times (ours from the phases jitted
separately at the step's shapes, the policy update being the rest of the step), the PSM's share,
and the achieved FLOP/s of our step against a measured float32 matmul peak. XLA's
``cost_analysis()`` counts a loop body once, so the FLOPs are also counted from the step's jaxpr
(dot_general + convolutions, scans multiplied by their length).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# XLA:CPU runs jnp.linalg.svd (the PSM's PCA) through scipy's OpenBLAS LAPACK, whose worker threads
# busy-wait: for 8 SVDs of 64x64 on 2 shared cores we measured a median of 216 ms (max 1.6 s) with
# its default threads against 6 ms with one. Must be set before numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# transformers / diffusers import torchvision, whose compiled fake-op registrations do not match the
# pinned CPU torch wheel; the reference models never use those ops (see tests/conftest.py).
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import flux  # noqa: E402
from pytorch_reference import torch_reference as tr  # noqa: E402
from pytorch_reference.parity import SIZES, Pair, build_pair, run_parity  # noqa: E402
from vipo_jax import rl  # noqa: E402
from vipo_jax.training.run import init_state  # noqa: E402
from vipo_jax.training.step import repeat_groups  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------
# Speed.


def _sub_jaxprs(params: dict[str, Any]):
    for v in params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def matmul_flops(jaxpr: Any) -> tuple[float, int]:
    """FLOPs of ``dot_general`` and ``conv_general_dilated`` in a jaxpr, scans multiplied by their
    length, ``cond`` by its largest branch; returns (flops, number of while loops counted once)."""
    total, whiles = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        subs = list(_sub_jaxprs(eqn.params))
        if not subs:
            continue
        counted = [matmul_flops(s) for s in subs]
        whiles += sum(n for _, n in counted)
        if name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in counted)
        elif name == "cond":
            total += max(f for f, _ in counted)
        else:
            whiles += name == "while"
            total += sum(f for f, _ in counted)
    return total, whiles


def _min_time(fn: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


_square = jax.jit(lambda x: x @ x)


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Measured float32 matmul FLOP/s of this CPU: (JAX, PyTorch)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    jax.block_until_ready(_square(a))
    t_j = _min_time(lambda: _square(a), repeats)
    ta = torch.randn(n, n)
    ta @ ta
    t_t = _min_time(lambda: ta @ ta, repeats)
    return 2.0 * n ** 3 / t_j, 2.0 * n ** 3 / t_t


def run_speed(pair: Pair, repeats: int, threads: tuple[int, ...], log: Callable[[str], None] = print) -> str:
    """Times one iteration of each side (PyTorch once per intra-op thread count in ``threads``)."""
    c, w = pair.step_cfg, pair.world
    G, S = c.group_size, c.num_steps
    P = pair.num_prompts
    latent_shape = pair.latent_shape
    batch = pair.batch
    opt = pair.optimizer()
    step = pair.train_step(opt)
    state = init_state(jax.tree.map(jnp.array, w.params), opt, 1)

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, w.frozen, batch)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla_flops = float((ca or {}).get("flops", float("nan")))
    jaxpr_flops, whiles = matmul_flops(jax.make_jaxpr(step)(state, w.frozen, batch).jaxpr)

    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], w.frozen, batch)
        return m

    jax.block_until_ready(one_step())  # warm-up
    log(f"  JAX step compiled in {t_lower + t_compile:.1f} s")

    # Phases, jitted separately at the step's shapes (as benchmarks/step_breakdown.py).
    sigmas = rl.sigma_schedule(S, c.shift)
    cond = repeat_groups(batch["cond"], G)
    params = jax.tree.map(jnp.array, holder["state"]["params"])  # a copy: the step donates its state
    rollout = jax.jit(lambda p, k: rl.rollout(lambda x, s, cc: w.velocity_fn(p, x, s, cc),
                                              rl.initial_noise(k, P, G, latent_shape), cond, sigmas, c.eta, k))
    key = jax.random.PRNGKey(0)
    ro = rollout(params, key)
    decode = jax.jit(w.decode_fn)
    images = decode(w.frozen, ro["x0"])
    reward_fn = w.rewards[c.rewards[0][0]]
    per_sample = repeat_groups({k: v for k, v in batch.items() if k != "cond"}, G)
    reward = jax.jit(lambda f, im: rl.group_advantages(reward_fn(f, im, per_sample), G))
    psm = jax.jit(lambda f, im: rl.psm_map(w.feature_fn(f, im), latent_shape[:2], c.psm))
    jax_phases = {"rollout": lambda: rollout(params, key), "decode": lambda: decode(w.frozen, ro["x0"]),
                  "reward + advantages": lambda: reward(w.frozen, images), "psm": lambda: psm(w.frozen, images)}
    for fn in jax_phases.values():
        jax.block_until_ready(fn())

    topt = pair.torch_optimizer()
    gen = torch.Generator().manual_seed(0)
    lshape = pair.torch_latent_shape()

    def torch_iteration() -> tr.IterationResult:
        return tr.iteration(pair.t_flux, pair.t_vae, pair.t_dino, topt, pair.torch_cfg, pair.t_t5, pair.t_pooled,
                            lshape, generator=gen)

    for n in threads:  # warm-up
        torch.set_num_threads(n)
        torch_iteration()

    # Interleaved rounds (JAX step, JAX phases, PyTorch iteration per thread count, matmuls), so
    # that a burst of load from other processes hits every side alike; each quantity's minimum is
    # reported.
    runs: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        runs.setdefault(name, []).append(seconds)

    phase_keys = (("rollout", ("rollout",)), ("decode", ("decode",)), ("reward + advantages", ("reward", "advantages")),
                  ("psm", ("psm",)), ("policy update", ("train",)))
    for r in range(repeats):
        record("jax step", _min_time(one_step, 1))
        for name, fn in jax_phases.items():
            record("jax " + name, _min_time(fn, 1))
        for n in threads:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            res = torch_iteration()
            record(f"torch{n} step", time.perf_counter() - t0)
            for name, keys in phase_keys:
                record(f"torch{n} {name}", sum(res.phases.get(k, 0.0) for k in keys))
        torch.set_num_threads(max(threads))
        peak_j, peak_t = matmul_peak(repeats=1)
        record("peak jax", -peak_j)
        record("peak torch", -peak_t)
        log(f"  round {r + 1}/{repeats}: JAX {1e3 * runs['jax step'][-1]:.0f} ms, " + ", ".join(
            f"PyTorch ({n} threads) {1e3 * runs[f'torch{n} step'][-1]:.0f} ms" for n in threads))
    best = {k: min(v) for k, v in runs.items()}
    med = {k: float(np.median(v)) for k, v in runs.items()}
    t_step = best["jax step"]
    peak_j, peak_t = -best["peak jax"], -best["peak torch"]
    jp = {k: best["jax " + k] for k in jax_phases}
    jp["policy update"] = max(0.0, t_step - sum(jp.values()))

    K = c.num_train_timesteps
    d = pair.size["dit"]
    n_img, width = latent_shape[0] * latent_shape[1] // 4, d["num_attention_heads"] * d["attention_head_dim"]
    medians = ", ".join([f"JAX {1e3 * med['jax step']:.0f} ms"]
                        + [f"PyTorch ({n} thr.) {1e3 * med[f'torch{n} step']:.0f} ms" for n in threads])
    lines = [f"Iteration: {P} prompts x G={G}, {S} sampling steps, {K} trained per sample, latent "
             f"{latent_shape}, image {pair.size['image']}^2, DiT width {width} x {d['num_layers']}+"
             f"{d['num_single_layers']} blocks over {n_img}+{pair.size['text_len']} tokens; "
             f"float32; min of {repeats} interleaved rounds (medians of the whole iteration: {medians}).", "",
             "| phase | JAX ms | " + " | ".join(f"PyTorch {n} thr. ms | PyTorch/JAX" for n in threads) + " |",
             "|---|---:|" + "---:|---:|" * len(threads)]
    for k in jp:
        cells = []
        for n in threads:
            tv = best[f"torch{n} {k}"]
            cells.append(f"{1e3 * tv:.1f} | " + (f"{tv / jp[k]:.1f}" if jp[k] > 0 else "-"))
        lines.append(f"| {k} | {1e3 * jp[k]:.1f} | " + " | ".join(cells) + " |")
    lines.append(f"| **whole iteration** | **{1e3 * t_step:.1f}** | " + " | ".join(
        f"**{1e3 * best[f'torch{n} step']:.1f}** | **{best[f'torch{n} step'] / t_step:.1f}**" for n in threads) + " |")
    fastest = min(best[f"torch{n} step"] for n in threads)
    cache = "persistent cache on" if getattr(jax.config, "jax_compilation_cache_dir", None) else "no persistent cache"
    lines += ["", f"JAX compile (lower + compile, {cache}): {t_lower + t_compile:.1f} s "
              f"({t_lower:.1f} s tracing/lowering + {t_compile:.1f} s XLA).",
              f"PSM share of the iteration: JAX {100 * jp['psm'] / t_step:.1f}%, " + ", ".join(
                  f"PyTorch ({n} thr.) {100 * best[f'torch{n} psm'] / best[f'torch{n} step']:.1f}%" for n in threads)
              + " (paper: +1.4% step time on FLUX.1 at 512^2).",
              "JAX policy update = whole step minus the separately jitted phases.",
              "",
              f"FLOPs of our step: XLA cost_analysis {xla_flops / 1e9:.3f} GFLOP (loop bodies counted once); "
              f"jaxpr dot+conv with scan trip counts {jaxpr_flops / 1e9:.3f} GFLOP"
              + (f" ({whiles} while loops counted once)" if whiles else "") + ".",
              f"Achieved: {jaxpr_flops / t_step / 1e9:.2f} GFLOP/s = {100 * jaxpr_flops / t_step / peak_j:.1f}% of "
              f"the measured float32 matmul peak {peak_j / 1e9:.1f} GFLOP/s (2048^2 jnp matmul; torch.mm with "
              f"{max(threads)} threads: {peak_t / 1e9:.1f} GFLOP/s); the fastest PyTorch iteration at the same "
              f"FLOPs: {jaxpr_flops / fastest / 1e9:.2f} GFLOP/s."]
    if hasattr(os, "getloadavg"):
        lines.append(f"Load average after the timed rounds: {os.getloadavg()[0]:.2f} on {usable_cores()} cores.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def machine_line(threads: tuple[int, ...]) -> str:
    import diffusers
    import transformers

    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"Machine: {cpu_model()}, {usable_cores()} usable cores{load}; JAX {jax.__version__} "
            f"({jax.default_backend()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), "
            f"torch {torch.__version__} ({'/'.join(map(str, threads))} threads), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="bench")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per side (the minimum is reported)")
    p.add_argument("--threads", default=",".join(dict.fromkeys(map(str, (usable_cores(), 1)))),
                   help="torch intra-op thread counts to time, comma-separated (the first one runs the parity); "
                        "its OpenMP workers busy-wait, so on a loaded machine 1 thread is the reliable number")
    p.add_argument("--skip-speed", action="store_true", help="parity only")
    p.add_argument("--skip-parity", action="store_true", help="speed only")
    p.add_argument("--compile-cache", action="store_true", help="use the persistent JAX compilation cache .cache/jax")
    args = p.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    if not threads or min(threads) < 1:
        p.error("--threads needs positive thread counts")
    torch.set_num_threads(threads[0])
    print(machine_line(threads), flush=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    parity = None
    with tempfile.TemporaryDirectory(prefix="vipo_vs_torch_") as tmp:
        if not args.skip_parity:
            pair = build_pair(flux.get_config(""), args.size, Path(tmp) / "parity")
            parity = run_parity(pair, log=log)
            print(f"\nParity ({args.size}: {pair.num_prompts} prompts x G={pair.step_cfg.group_size}, "
                  f"{pair.step_cfg.num_steps} steps, latent {pair.latent_shape}, T5 length "
                  f"{pair.config.sampling.max_text_len}):\n")
            print(parity.table(), flush=True)
        if not args.skip_speed:
            # fresh weights: the parity took an AdamW step on the torch transformer
            pair = build_pair(flux.get_config(""), args.size, Path(tmp) / "speed")
            print("\nSpeed:\n")
            print(run_speed(pair, args.repeats, threads, log=log))
    if parity is not None and not parity.ok:
        print("\nParity FAILED: " + ", ".join(c.name for c in parity.checks if not c.ok))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
