"""Plan a full-size run without its weights: build the models abstractly (``nnx.eval_shape``),
lower and compile the real train step for a mesh against abstract inputs, and read per-device
memory from XLA's memory analysis; FLOPs come from the analytic formulas (``flops.py``), checked
against XLA's count of one unrolled block pair at the real width and sequence length.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from vipo_jax import sharding as shd
from vipo_jax.errors import ConfigError
from vipo_jax.nn.stack import unrolled_stacks
from vipo_jax.plan.devices import Device
from vipo_jax.plan.flops import flux_forward_flops, iteration_flops, wan_forward_flops

GiB = 2**30


@dataclasses.dataclass
class Parts:
    """The abstract pieces of one ViPO step for a model family."""

    policy: Any  # abstract nnx module
    frozen: dict  # name -> abstract nnx state
    velocity_fn: Any
    decode_fn: Any
    feature_fn: Any
    reward_fns: dict
    batch: dict  # abstract per-prompt batch (ShapeDtypeStructs)
    latent_shape: tuple[int, ...]
    forward_flops: float  # one policy forward for one sample (both CFG halves counted by cfg_passes)
    cfg_passes: int
    check: tuple  # (analytic, fn, args) for the XLA cross-check of a 1-block-pair model
    describe: str


def _abstract(factory) -> tuple[Any, Any]:
    model = nnx.eval_shape(factory)
    return model, nnx.state(model)


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _hps_reward(dtype: str):
    from vipo_jax.models.clip import CLIPModel, config_from_open_clip
    from vipo_jax.models.clip.config import OPEN_CLIP_CONFIGS
    from vipo_jax.rewards.clip_scores import hps_v21_score

    cfg = config_from_open_clip(OPEN_CLIP_CONFIGS["ViT-H-14"], dtype=dtype)
    model, state = _abstract(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    gd = nnx.graphdef(model)
    return state, lambda frozen, images, batch: hps_v21_score(nnx.merge(gd, frozen["reward"]), images,
                                                              batch["reward_ids"])


def _dino(dtype: str, attention: str):
    from vipo_jax.models.dinov2 import Dinov2Model, preset
    from vipo_jax.models.dinov2.model import patch_tokens, preprocess

    model, state = _abstract(lambda: Dinov2Model(preset("vit_l14", dtype=dtype, attention=attention), rngs=nnx.Rngs(0)))
    gd = nnx.graphdef(model)

    def features(frozen, images):
        return patch_tokens(nnx.merge(gd, frozen["dinov2"]), preprocess(images, images.shape[1:3], patch_size=14))[0]

    return state, features


def flux_parts(c: mlc.ConfigDict) -> Parts:
    from vipo_jax.models.flux import FluxTransformer, preset
    from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
    from vipo_jax.models.vae.model import decode_to_unit
    from vipo_jax.worlds.flux_policy import flux_velocity

    m = c.model
    fcfg = preset(f"flux-{m.variant}", param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                  attention=m.attention)
    policy, _ = _abstract(lambda: FluxTransformer(fcfg, rngs=nnx.Rngs(0)))
    gd = nnx.graphdef(policy)
    vae, vae_state = _abstract(lambda: AutoencoderKL(AutoencoderKLConfig.flux1(dtype=m.dtype), rngs=nnx.Rngs(0)))
    gv = nnx.graphdef(vae)
    dino_state, features = _dino(m.dtype, m.attention)
    reward_state, reward = _hps_reward(m.dtype)
    h, w = c.sampling.height // 8, c.sampling.width // 8
    n_txt, P = c.sampling.max_text_len, c.sampling.prompts_per_iter
    guidance = fcfg.guidance_embeds

    def velocity_fn(params, x, sigma, cond):
        g = jnp.full((x.shape[0],), c.sampling.guidance, jnp.float32) if guidance else None
        return flux_velocity(nnx.merge(gd, params), x, sigma, cond["t5"], cond["pooled"], g)

    batch = {"cond": {"t5": _sds((P, n_txt, fcfg.joint_attention_dim), m.dtype),
                      "pooled": _sds((P, fcfg.pooled_projection_dim))},
             "reward_ids": _sds((P, 77), jnp.int32)}
    n_img = (h // 2) * (w // 2)
    small = fcfg.replace(num_layers=1, num_single_layers=1, remat="none")
    sp, sst = _abstract(lambda: FluxTransformer(small, rngs=nnx.Rngs(0)))
    sgd = nnx.graphdef(sp)

    def one_pair(st, x, t5, pooled):
        g = jnp.full((1,), 3.5, jnp.float32) if guidance else None
        return flux_velocity(nnx.merge(sgd, st), x, jnp.full((1,), 0.5), t5, pooled, g)

    check = (flux_forward_flops(small, n_img, n_txt), one_pair,
             (sst, _sds((1, h, w, 16)), _sds((1, n_txt, fcfg.joint_attention_dim), m.dtype),
              _sds((1, fcfg.pooled_projection_dim))))
    return Parts(policy=policy, frozen={"vae": vae_state, "dinov2": dino_state, "reward": reward_state},
                 velocity_fn=velocity_fn, decode_fn=lambda fr, x0: decode_to_unit(nnx.merge(gv, fr["vae"]), x0),
                 feature_fn=features, reward_fns={"hpsv21": reward}, batch=batch, latent_shape=(h, w, 16),
                 forward_flops=flux_forward_flops(fcfg, n_img, n_txt), cfg_passes=1, check=check,
                 describe=f"FLUX.1-{m.variant} {c.sampling.height}x{c.sampling.width}")


def wan_parts(c: mlc.ConfigDict) -> Parts:
    from vipo_jax.models.wan import WanTransformer
    from vipo_jax.models.wan import preset as wan_preset
    from vipo_jax.models.wan_vae import WanVAE, WanVAEConfig
    from vipo_jax.models.wan_vae.model import decode_to_unit
    from vipo_jax.rewards.video import map_frames
    from vipo_jax.worlds.wan_policy import wan_velocity

    m, s = c.model, c.sampling
    size = str(m.variant)
    wcfg = wan_preset(f"wan2.1-t2v-{size}", param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                      attention=m.attention)
    policy, _ = _abstract(lambda: WanTransformer(wcfg, rngs=nnx.Rngs(0)))
    gd = nnx.graphdef(policy)
    vcfg = WanVAEConfig.wan21(dtype=m.dtype)
    vae, vae_state = _abstract(lambda: WanVAE(vcfg, rngs=nnx.Rngs(0)))
    gv = nnx.graphdef(vae)
    dino_state, frame_features = _dino(m.dtype, m.attention)
    reward_state, frame_reward = _hps_reward(m.dtype)
    frames = int(s.num_frames)
    t_lat, h, w = (frames - 1) // 4 + 1, s.height // 8, s.width // 8
    n_txt, P, g = s.max_text_len, s.prompts_per_iter, float(s.guidance)
    cfg_on = g > 1.0

    def velocity_fn(params, x, sigma, cond):
        return wan_velocity(nnx.merge(gd, params), x, sigma, cond["text"], cond["neg"] if cfg_on else None,
                            g if cfg_on else None)

    def feature_fn(frozen, videos):
        return map_frames(lambda fr: frame_features(frozen, fr), videos, 0)

    def reward(frozen, videos, batch):
        b, t = videos.shape[:2]
        flat = videos.reshape((b * t,) + videos.shape[2:])
        ids = jnp.repeat(batch["reward_ids"], t, axis=0)
        return frame_reward(frozen, flat, {"reward_ids": ids}).reshape(b, t).mean(axis=1)

    text = _sds((P, n_txt, wcfg.text_dim), m.dtype)
    batch = {"cond": {"text": text, "neg": text},
             "reward_ids": _sds((P, 77), jnp.int32)}
    n_video = t_lat * (h // 2) * (w // 2)
    small = wcfg.replace(num_layers=1, remat="none")
    sp, sst = _abstract(lambda: WanTransformer(small, rngs=nnx.Rngs(0)))
    sgd = nnx.graphdef(sp)

    def one_block(st, x, text):
        return wan_velocity(nnx.merge(sgd, st), x, jnp.full((1,), 0.5), text)

    check = (wan_forward_flops(small, n_video, n_txt), one_block,
             (sst, _sds((1, t_lat, h, w, 16)), _sds((1, n_txt, wcfg.text_dim), m.dtype)))
    return Parts(policy=policy, frozen={"vae": vae_state, "dinov2": dino_state, "reward": reward_state},
                 velocity_fn=velocity_fn, decode_fn=lambda fr, x0: decode_to_unit(nnx.merge(gv, fr["vae"]), x0),
                 feature_fn=feature_fn, reward_fns={"hpsv21_frames": reward}, batch=batch,
                 latent_shape=(t_lat, h, w, 16), forward_flops=wan_forward_flops(wcfg, n_video, n_txt),
                 cfg_passes=2 if cfg_on else 1, check=check,
                 describe=f"Wan2.1-T2V-{size.upper()} {frames}x{s.height}x{s.width}")


def _bytes_per_device(tree: Any, shardings: Any) -> float:
    total = 0.0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(tuple(x.shape))) * jnp.dtype(x.dtype).itemsize
    return total


def _xla_flops(fn, *args) -> float:
    with unrolled_stacks():
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def plan(c: mlc.ConfigDict, device: Device, *, mfu: float = 0.4, mesh: jax.sharding.Mesh | None = None,
         check_flops: bool = True) -> dict:
    """Compile the configured train step for ``mesh`` (default: ``c.mesh`` over all devices) against
    abstract inputs and return its per-device memory and per-iteration FLOPs and time estimate."""
    from vipo_jax.training.run import init_state, make_optimizer
    from vipo_jax.training.step import jit_train_step, make_train_step
    from vipo_jax.worlds.flux import step_config

    family = c.model.family
    if family not in ("flux", "wan"):
        raise ConfigError(f"the planner knows model.family flux and wan, not {family!r}")
    parts = flux_parts(c) if family == "flux" else wan_parts(c)
    mesh = mesh or shd.make_mesh(c.get("mesh"))
    rules = shd.rules_from_config(c)
    n_dev = mesh.devices.size
    sc = dataclasses.replace(step_config(c), rewards=tuple((n, 1.0) for n in parts.reward_fns))
    opt: optax.GradientTransformation = make_optimizer(c)
    params = nnx.state(parts.policy)
    state = jax.eval_shape(lambda p: init_state(p, opt, 0), params)
    state_sh = shd.param_shardings(state, rules, mesh)
    frozen_sh = shd.param_shardings(parts.frozen, rules, mesh)
    batch_sh = jax.tree.map(lambda x: shd.batch_sharding(x.shape, mesh, rules), parts.batch)
    step = make_train_step(sc, velocity_fn=parts.velocity_fn, decode_fn=parts.decode_fn,
                           reward_fns=parts.reward_fns, feature_fn=parts.feature_fn, optimizer=opt,
                           latent_shape=parts.latent_shape)
    t0 = time.perf_counter()
    with shd.activate(mesh, rules):
        jitted = jit_train_step(step, state_shardings=state_sh, frozen_shardings=frozen_sh,
                                batch_shardings=batch_sh, mesh=mesh)
        compiled = jitted.lower(state, parts.frozen, parts.batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    B = c.sampling.prompts_per_iter * c.sampling.group_size
    it = iteration_flops(parts.forward_flops, samples=B, num_steps=sc.num_steps, trained_steps=sc.num_train_timesteps,
                         remat=c.model.remat, cfg_passes=parts.cfg_passes)
    out = {
        "model": parts.describe, "mesh": dict(mesh.shape), "devices": n_dev, "device": device.name,
        "samples_per_iteration": B, "compile_s": compile_s,
        "params_gib": _bytes_per_device(state["params"], state_sh["params"]) / GiB,
        "optimizer_gib": _bytes_per_device(state["opt_state"], state_sh["opt_state"]) / GiB,
        "frozen_gib": _bytes_per_device(parts.frozen, frozen_sh) / GiB,
        "gradients_gib": sum(math.prod(sh.shard_shape(tuple(x.shape))) * 4 for x, sh in zip(
            jax.tree.leaves(state["params"]), jax.tree.leaves(state_sh["params"]), strict=True)) / GiB,
        "arguments_gib": mem.argument_size_in_bytes / GiB if mem else float("nan"),
        "temporaries_gib": mem.temp_size_in_bytes / GiB if mem else float("nan"),
        "outputs_gib": mem.output_size_in_bytes / GiB if mem else float("nan"),
        "aliased_gib": mem.alias_size_in_bytes / GiB if mem else float("nan"),
        "model_tflop": it.model_flops / 1e12, "hardware_tflop": it.hardware_flops / 1e12,
        "mfu": mfu,
    }
    out["peak_gib"] = out["arguments_gib"] + out["temporaries_gib"] + out["outputs_gib"] - out["aliased_gib"]
    out["fits"] = bool(out["peak_gib"] <= device.memory_gib)
    out["predicted_s"] = it.hardware_flops / n_dev / (device.bf16_tflops * 1e12 * mfu)
    if check_flops:
        analytic, fn, args = parts.check
        xla = _xla_flops(fn, *args)
        out["flops_check"] = {"analytic_tflop": analytic / 1e12, "xla_tflop": xla / 1e12,
                              "rel_diff": float(analytic / xla - 1) if xla else float("nan")}
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | mesh | device | params | optimizer | frozen | XLA args | XLA temps (activations, grads) | "
            "peak / device | fits | TFLOP / it (model / HW) | predicted s / it @ MFU |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        mesh = "×".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        lines.append(
            f"| {r['model']}, {r['samples_per_iteration']} samples/it | {mesh} | {r['device']} | "
            f"{r['params_gib']:.2f} | {r['optimizer_gib']:.2f} | {r['frozen_gib']:.2f} | {r['arguments_gib']:.2f} | "
            f"{r['temporaries_gib']:.2f} | {r['peak_gib']:.2f} GiB | {'yes' if r['fits'] else 'NO'} | "
            f"{r['model_tflop']:.0f} / {r['hardware_tflop']:.0f} | {r['predicted_s']:.1f} @ {100 * r['mfu']:.0f}% |")
    return "\n".join(lines)


def flops_check_line(r: dict) -> str:
    f = r.get("flops_check")
    if not f:
        return ""
    return (f"FLOP check (one block pair at full width and sequence, unrolled): analytic {f['analytic_tflop']:.3f} "
            f"TFLOP vs XLA {f['xla_tflop']:.3f} TFLOP ({100 * f['rel_diff']:+.1f}%)")


__all__ = ["Parts", "flops_check_line", "flux_parts", "plan", "table", "wan_parts"]
