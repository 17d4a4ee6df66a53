"""One ViPO iteration of the FLUX.1-dev recipe on one accelerator: iteration time, peak memory, MFU
per phase, with and without the SDE window.

    python benchmarks/gpu_step.py --full --lora 64 --group 12 --micro_batch 4   # the paper's shapes
    python benchmarks/gpu_step.py --full --lora 64 --group 12 --micro_batch 4 --window 2
    python benchmarks/gpu_step.py --dry_run        # minutes on a CPU: every code path, tiny shapes

``--full``: FLUX.1-dev's 19 double + 38 single blocks at width 3072 (12B parameters, random
weights: speed does not depend on them), the real VAE and DINOv2-L shapes, T5 length 512, 512²,
bf16 compute over float32 master weights (the configs/flux.py recipe, ``world=random``). Without
``--full`` the width stays and ``--double`` / ``--single`` blocks are built (the 2 + 4 block step
fits any GPU). ``--lora R`` trains rank-R adapters of the attention and MLP projections (the
base weights frozen in bf16 with ``--frozen_bf16``, default on with LoRA: 24 GB instead of 48 GB).
The reward is redness (a reward model's cost is a small share at this size; the planner counts
HPSv2.1). Each configuration in ``--window`` (comma-separated, 0 = the full SDE) is one row:

    iteration s | peak GiB | model TFLOP/it | MFU | rollout / decode / reward / PSM / update s and MFU

Per-phase times come from each phase jitted alone at the step's shapes (training/throughput.py);
the update is the whole step minus the others. MFU is against the vendor's dense bf16 peak for a
known device (utils/devices.py), else a bf16 matmul measured here. ``--dry_run`` uses 1 + 1 blocks
of width 128, 128², G 2 and the XLA attention on any backend, and checks every row ran.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.flux import get_config  # noqa: E402
from vipo_jax.training.lora import lora_config  # noqa: E402
from vipo_jax.training.optim import make_optimizer  # noqa: E402
from vipo_jax.training.run import init_state  # noqa: E402
from vipo_jax.training.step import train_step_for  # noqa: E402
from vipo_jax.training.step_config import StepConfig  # noqa: E402
from vipo_jax.training.throughput import phase_report, profile_phases  # noqa: E402
from vipo_jax.worlds import build_world  # noqa: E402

DRY = "num_layers=1,num_single_layers=1,num_attention_heads=1,joint_attention_dim=64,pooled_projection_dim=32"


def step_config(a: argparse.Namespace, window: int):
    c = get_config("")
    c.world = "random"
    c.model.remat, c.model.attention = a.remat, a.attention
    if a.dry_run:
        c.model.arch, c.model.attention = DRY, "xla"
        c.sampling.height = c.sampling.width = 128
        c.sampling.max_text_len = 16
    elif not a.full:
        c.model.arch = f"num_layers={a.double},num_single_layers={a.single}"
    c.sampling.group_size, c.sampling.prompts_per_iter = a.group, a.prompts
    c.train.micro_batch = a.micro_batch
    c.sampling.sde_window = window
    c.lora.rank = a.lora
    c.rewards.names, c.rewards.coefs = "redness", "1.0"
    return c


def peak_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


def run_one(a: argparse.Namespace, window: int) -> dict:
    c = step_config(a, window)
    world = build_world(c)
    forward_flops = world.family.forward_flops(c, world.policy())
    params = world.params
    lora = lora_config(c)
    if lora.enabled:
        world, params, _ = world.with_lora(lora, c.seed)
        if a.frozen_bf16:  # the frozen base weights in bf16: half the memory, the compute dtype anyway
            world = world.placed(jax.tree.map(
                lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, world.frozen))
    sc = StepConfig.from_config(c)
    opt = make_optimizer(c)
    step = train_step_for(world, sc, opt)
    batch = world.batch(np.arange(a.prompts))
    state = init_state(params, opt, 0)
    n_trained = sum(x.size for x in jax.tree.leaves(params))
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, world.frozen, batch).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    state, m = compiled(state, world.frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        state, m = compiled(state, world.frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    assert np.isfinite(float(m["loss"])), "the step's loss is not finite"
    full = world.full_params(state["params"], world.frozen) if lora.enabled else state["params"]
    profile = profile_phases(world, sc, full, world.frozen, batch, micro_batch=c.train.micro_batch,
                             remat=c.model.remat, forward_flops=forward_flops)
    rep = phase_report(profile, min(times))
    temp = getattr(mem, "temp_size_in_bytes", float("nan"))
    args = getattr(mem, "argument_size_in_bytes", float("nan"))
    peak = peak_bytes()  # the allocator's peak on a GPU; XLA's arguments + temporaries elsewhere (no stats)
    return {"window": window, "compile_s": compile_s, "iter_s": min(times),
            "peak_gib": (peak if np.isfinite(peak) else temp + args) / 2**30,
            "xla_gib": (temp + args) / 2**30, "trained_m": n_trained / 1e6, "report": rep,
            "peak_source": profile["_peak_source"], "train_steps": sc.num_train_timesteps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="FLUX.1-dev's 19 + 38 blocks")
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    p.add_argument("--frozen_bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--group", type=int, default=12)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--window", default="0,2", help="comma-separated sampling.sde_window values (0: full SDE)")
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", default="full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry_run", action="store_true", help="tiny shapes on any backend: checks the script")
    a = p.parse_args(argv)
    if a.dry_run:
        a.group, a.micro_batch, a.repeats, a.lora, a.attention = 2, 1, 1, a.lora or 4, "xla"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    rows = [run_one(a, int(w)) for w in a.window.split(",")]
    what = "dry run (1+1 blocks, width 128, 128^2)" if a.dry_run else \
        ("FLUX.1-dev 19+38 blocks" if a.full else f"FLUX width {a.double}+{a.single} blocks")
    print(f"\n{what}, 512^2 unless a dry run, {a.prompts} prompt x G {a.group}, micro-batch {a.micro_batch}, "
          f"LoRA {a.lora or 'off'}, remat {a.remat}, attention {a.attention}; "
          f"MFU against the {rows[0]['peak_source']}\n")
    print("| SDE window | trained steps | compile s | iteration s | peak GiB | model TFLOP/it | step MFU | "
          "rollout s (MFU) | decode s | rewards s | PSM s | update s (MFU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["report"]
        print(f"| {r['window'] or 'full'} | {r['train_steps']} | {r['compile_s']:.0f} | {r['iter_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {q['phase/step_tflop']:.1f} | {100 * q['phase/step_mfu']:.1f}% | "
              f"{q['phase/rollout_s']:.2f} ({100 * q['phase/rollout_mfu']:.0f}%) | {q['phase/decode_s']:.2f} | "
              f"{q['phase/rewards_s']:.2f} | {q.get('phase/psm_s', 0.0):.2f} | "
              f"{q['phase/update_s']:.2f} ({100 * q['phase/update_mfu']:.0f}%) |")
    if a.dry_run:
        assert len(rows) == len(a.window.split(",")) and all(r["iter_s"] > 0 for r in rows)
        print("\ndry run ok")


if __name__ == "__main__":
    main()
