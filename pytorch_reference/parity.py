"""Our jitted ViPO iteration against the PyTorch one organised like the reference scripts
(:mod:`pytorch_reference.torch_reference`), from the same weights and randomness. For the tests and
benchmarks only (``tests/test_vs_pytorch.py``, ``benchmarks/vs_pytorch.py``).

Both sides run the same models: a tiny random diffusers FLUX.1 pipeline folder and a transformers
DINOv2 folder, written by the reference libraries (:mod:`pytorch_reference.reference_pipelines`, norm
scales randomised). Ours is the pretrained world of a config naming those folders
(``build_world(c)``: our loaders, our prompt-embedding cache, the registered ``redness`` reward, the
DINOv2 PSM backbone) and its step (``train_step_for``, ``StepConfig.from_config``,
``make_optimizer``); the PyTorch side keeps the torch modules the writers saved and is given exactly
the conditioning our world uses (its cached T5 states and pooled CLIP vectors).

:func:`run_parity`: the PyTorch side is fed our initial noise, SDE noise, trajectory (each
transition's log-prob is evaluated on our ``x_t -> x_{t+1}``, as a training pass does) and trained
timesteps; everything downstream (x0, images, rewards, DINOv2 features, PSM maps, advantages, loss,
gradients, parameters after AdamW) it computes itself. The same ``vipo_jax.rl`` functions as the
step's, jitted once more, expose the intermediates the step does not return. The gradients of the
jitted step are read back through an optax transformation that keeps them in the optimizer state;
PyTorch's are mapped into our parameter layout with our own converter (a linear re-arrangement).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import torch
from flax import nnx

from pytorch_reference import torch_reference as tr
from pytorch_reference.reference_pipelines import perturb_norms, write_dinov2, write_flux_pipeline
from vipo_jax import rl
from vipo_jax.models.flux import convert_diffusers
from vipo_jax.toy import sizes as toy_sizes
from vipo_jax.training.optim import make_optimizer
from vipo_jax.training.run import init_state
from vipo_jax.training.step import repeat_groups, train_step_for
from vipo_jax.training.step_config import StepConfig
from vipo_jax.worlds import World, build_world

# ------------------------------------------------------------------------------------------------
# Sizes. "bench" is the toy world's models (vipo_jax/toy/sizes.py) at 64^2 (16x16x4 latent, 8x8 DINOv2
# patches), 8 sampling steps, 2 prompts x G=4; "test" is the smallest that keeps every code path.
# ``text_len`` is the T5 length (``sampling.max_text_len``); the text encoders' widths are the DiT's.

SIZES: dict[str, dict[str, Any]] = {
    "bench": dict(image=64, steps=8, group=4, prompts=2, text_len=8, dit=dict(toy_sizes.DIT),
                  vae=dict(toy_sizes.VAE), dino=dict(toy_sizes.DINO)),
    "test": dict(image=32, steps=4, group=2, prompts=2, text_len=4,
                 dit=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                          guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                 vae=dict(toy_sizes.VAE, block_out_channels=(8, 8, 16), sample_size=32),
                 dino=dict(toy_sizes.DINO, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32)),
}
#: the prompts file's captions (the first ``size["prompts"]``)
CAPTIONS = ("a red 3 on a blue background", "a green 7 on a white background", "a blue 1 on a black background",
            "a yellow 5 on a gray background", "a cyan 0 on a magenta background", "a white 8 on a red background")
#: seeds of :func:`perturb_norms` per written module
NORM_SEEDS = {"transformer": 1, "vae": 2, "dinov2": 3}


def _perturb(name: str, module: torch.nn.Module) -> None:
    if name in NORM_SEEDS:
        perturb_norms(module, NORM_SEEDS[name])


# ------------------------------------------------------------------------------------------------
# The two sides.


@dataclasses.dataclass
class Pair:
    """Both sides of the comparison: our pretrained world of ``config`` and its step settings, and
    the torch modules (same weights) with the world's conditioning of the ``P`` prompts."""

    size: dict[str, Any]
    config: mlc.ConfigDict
    world: World
    step_cfg: StepConfig
    torch_cfg: tr.TorchConfig
    batch: dict[str, Any]  # world.batch(arange(P))
    t_flux: torch.nn.Module
    t_vae: torch.nn.Module
    t_dino: torch.nn.Module
    t_t5: torch.Tensor  # (P, L, D): the world's T5 states
    t_pooled: torch.Tensor  # (P, D): the world's pooled CLIP vectors

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.world.latent_shape)

    @property
    def num_prompts(self) -> int:
        return int(self.t_t5.shape[0])

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's AdamW after grad-norm clipping (``config.optim``)."""
        return make_optimizer(self.config)

    def train_step(self, optimizer: optax.GradientTransformation) -> Callable:
        return train_step_for(self.world, self.step_cfg, optimizer)

    def torch_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.AdamW(self.t_flux.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay)

    def torch_latent_shape(self) -> tuple[int, int, int]:
        """One sample's latent as (C, H, W)."""
        h, w, ch = self.latent_shape
        return ch, h, w


def write_references(size: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """The reference folders of ``size`` under ``folder``: ``FLUX.1-tiny/`` (float32, norms
    perturbed), ``dinov2/`` and ``data/prompts.txt``. Returns their paths and the torch modules."""
    folder = Path(folder)
    d = size["dit"]
    modules = write_flux_pipeline(torch, folder / "FLUX.1-tiny", transformer=size["dit"], vae=size["vae"],
                                  t5_dim=d["joint_attention_dim"], clip_dim=d["pooled_projection_dim"],
                                  dtype="float32", seed=0, prepare=_perturb)
    dino = write_dinov2(torch, folder / "dinov2", config=size["dino"], seed=0, prepare=_perturb)
    if size["prompts"] > len(CAPTIONS):
        raise ValueError(f"at most {len(CAPTIONS)} prompts")
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompts = data / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in CAPTIONS[: size["prompts"]]))
    return {"pipeline": folder / "FLUX.1-tiny", "dinov2": folder / "dinov2", "prompts": prompts,
            "cache_dir": data / "cache", "transformer": modules["transformer"], "vae": modules["vae"], "dino": dino}


def configure(c: mlc.ConfigDict, size: dict[str, Any], refs: dict[str, Any]) -> mlc.ConfigDict:
    """``c`` (the FLUX.1-dev recipe, ``configs/flux.py``) as the pretrained world of the written
    folders at ``size``: float32, no remat, the redness reward, ``size``'s resolution, steps, group,
    prompts and T5 length."""
    c = c.copy_and_resolve_references()
    c.world = "real"
    c.model.path = str(refs["pipeline"])
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.psm.enabled = True
    c.psm.backbone = str(refs["dinov2"])
    c.rewards.names = "redness"
    c.rewards.coefs = "1.0"
    c.data.prompts = str(refs["prompts"])
    c.data.cache_dir = str(refs["cache_dir"])
    c.sampling.height = c.sampling.width = int(size["image"])
    c.sampling.num_steps = int(size["steps"])
    c.sampling.group_size = int(size["group"])
    c.sampling.prompts_per_iter = int(size["prompts"])
    c.sampling.max_text_len = int(size["text_len"])
    c.log.num_eval_prompts = int(size["prompts"])
    return c


def build_pair(c: mlc.ConfigDict, size: str | dict[str, Any], folder: str | Path) -> Pair:
    """Writes the reference folders of ``size`` (a :data:`SIZES` name or such a dict) under ``folder``
    and builds our world from ``c`` configured for them (:func:`configure`)."""
    size = SIZES[size] if isinstance(size, str) else size
    refs = write_references(size, folder)
    c = configure(c, size, refs)
    world = build_world(c)
    step_cfg = StepConfig.from_config(c)
    batch = world.batch(np.arange(size["prompts"]))
    cond = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in batch["cond"].items()}
    torch_cfg = tr.TorchConfig.from_step(step_cfg, guidance=world.options.guidance, grad_clip=c.optim.grad_clip)
    return Pair(size=size, config=c, world=world, step_cfg=step_cfg, torch_cfg=torch_cfg, batch=batch,
                t_flux=refs["transformer"], t_vae=refs["vae"], t_dino=refs["dino"], t_t5=cond["t5"],
                t_pooled=cond["pooled"])


# ------------------------------------------------------------------------------------------------
# Helpers.


def intermediates_fn(pair: Pair) -> Callable:
    """The step's rollout -> decode -> reward -> PSM -> advantages -> timesteps with the same
    ``vipo_jax.rl`` calls and the same keys (``training/step.py`` splits the state's RNG into
    ``(next, noise, sde, timesteps)``), returning what the step keeps to itself."""
    c, w = pair.step_cfg, pair.world
    sigmas = rl.sigma_schedule(c.num_steps, c.shift)
    latent_shape = pair.latent_shape
    reward_name = c.rewards[0][0]

    def run(params, frozen, batch, key):
        _, k_noise, k_sde, k_ts = jax.random.split(key, 4)
        P = jax.tree.leaves(batch["cond"])[0].shape[0]
        B = P * c.group_size
        cond = repeat_groups(batch["cond"], c.group_size)
        x_init = rl.initial_noise(k_noise, P, c.group_size, latent_shape)
        ro = rl.rollout(lambda x, s, cc: w.velocity_fn(params, x, s, cc), x_init, cond, sigmas, c.eta, k_sde,
                        return_noise=True)
        images = w.decode_fn(frozen, ro["x0"])
        per_sample = repeat_groups({k: v for k, v in batch.items() if k != "cond"}, c.group_size)
        rewards = w.rewards[reward_name](frozen, images, per_sample)
        feats = w.feature_fn(frozen, images)
        maps = rl.psm_map(feats, latent_shape[:2], c.psm)
        return {"latents": ro["latents"], "noise": ro["noise"], "log_probs": ro["log_probs"], "x0": ro["x0"],
                "images": images, "rewards": rewards, "features": feats, "maps": maps,
                "advantages": rl.group_advantages(rewards, c.group_size),
                "timesteps": rl.sample_train_timesteps(k_ts, B, c.num_steps, c.timestep_fraction)}

    return run


def capture_grads() -> optax.GradientTransformation:
    """Passes the gradients through unchanged and keeps them as its state, so that the gradients
    the jitted step computed can be read back from ``state["opt_state"][0]``."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def flat(state: Any) -> dict[str, np.ndarray]:
    """nnx State -> {dotted path: array}, the keys of our weight converters."""
    return {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(state)}


def torch_as_ours(pair: Pair, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """diffusers-named tensors (gradients or parameters) -> our layout, by our checkpoint converter."""
    return convert_diffusers({k: v.detach().float().numpy() for k, v in tensors.items()}, pair.world.policy().cfg,
                             where="torch tensors")


def nchw(a: Any) -> torch.Tensor:
    """(..., H, W, C) -> (..., C, H, W) float32 torch tensor."""
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().numpy(), -3, -1)


# ------------------------------------------------------------------------------------------------
# Parity.


@dataclasses.dataclass
class Check:
    name: str
    err: float  # max abs difference
    scale: float  # what it is compared to
    tol: float  # err must be <= tol * scale
    note: str = ""
    info: bool = False  # reported, not asserted

    @property
    def rel(self) -> float:
        return self.err / self.scale if self.scale > 0 else (0.0 if self.err == 0 else math.inf)

    @property
    def ok(self) -> bool:
        return self.info or self.err <= self.tol * self.scale


def check(name: str, ours: Any, ref: Any, tol: float, scale: float | None = None, note: str = "",
          info: bool = False) -> Check:
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape} vs {b.shape}")
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    if scale is None:
        scale = float(np.max(np.abs(b))) if b.size else 1.0
    return Check(name, err, scale, tol, note, info)


@dataclasses.dataclass
class ParityResult:
    checks: list[Check]
    jax_compile_s: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = ["| quantity | max abs diff | scale | diff / scale | tolerance | ok |", "|---|---:|---:|---:|---:|---|"]
        for c in self.checks:
            ok = "info" if c.info else ("yes" if c.ok else "**FAIL**")
            name = c.name + (f" ({c.note})" if c.note else "")
            lines.append(f"| {name} | {c.err:.2e} | {c.scale:.3g} | {c.rel:.2e} | {c.tol:.0e} | {ok} |")
        return "\n".join(lines)


def run_parity(pair: Pair, seed: int = 0, log: Callable[[str], None] = print) -> ParityResult:
    """One iteration on both sides from the same parameters and randomness; see the module docstring.
    Takes one AdamW step on ``pair.t_flux`` (build a fresh pair for anything after it)."""
    c, w = pair.step_cfg, pair.world
    S, G = c.num_steps, c.group_size
    lr = float(pair.config.optim.lr)
    reward_name = c.rewards[0][0]
    t0 = time.perf_counter()
    mid = jax.tree.map(np.asarray, jax.jit(intermediates_fn(pair))(w.params, w.frozen, pair.batch,
                                                                      jax.random.PRNGKey(seed)))
    opt = optax.chain(capture_grads(), pair.optimizer())
    state = init_state(jax.tree.map(jnp.array, w.params), opt, seed)  # a copy: the step donates it
    step = jax.jit(pair.train_step(opt), donate_argnums=0)
    state, metrics = step(state, w.frozen, pair.batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in metrics.items()}
    j_grads = flat(state["opt_state"][0])
    j_params = flat(state["params"])
    p0 = flat(w.params)
    log(f"  JAX intermediates + step (compile and run): {compile_s:.1f} s")

    # A free-running PyTorch rollout with our initial and SDE noise (before its AdamW step below):
    # how far the two sampled trajectories drift apart.
    t0 = time.perf_counter()
    x_init = nchw(mid["latents"][0])
    sigmas = tr.sigma_schedule(S, c.shift)
    noise = nchw(mid["noise"])
    free = [tr.rollout_sample(pair.t_flux, x_init[i:i + 1], pair.t_t5[i // G:i // G + 1],
                              pair.t_pooled[i // G:i // G + 1], sigmas, pair.torch_cfg, noise=noise[:, i:i + 1])[0]
            for i in range(x_init.shape[0])]
    free_latents = nhwc(torch.cat(free, dim=1))
    # PyTorch: fed our noise, trajectory and timesteps; computes everything downstream itself.
    fixed = tr.Fixed(x_init=x_init, latents=nchw(mid["latents"]),
                     timesteps=torch.from_numpy(mid["timesteps"].astype(np.int64)))
    res = tr.iteration(pair.t_flux, pair.t_vae, pair.t_dino, pair.torch_optimizer(), pair.torch_cfg, pair.t_t5,
                       pair.t_pooled, pair.torch_latent_shape(), fixed=fixed)
    log(f"  PyTorch free rollout + iteration: {time.perf_counter() - t0:.1f} s")

    t_grads = torch_as_ours(pair, res.grads)
    t_params = torch_as_ours(pair, dict(pair.t_flux.named_parameters()))
    assert set(t_grads) == set(j_grads), sorted(set(t_grads) ^ set(j_grads))[:5]

    # Per-transition log-probs, one per latent position (summed over channels): SDE transitions only
    # (the last, deterministic, step has log-prob 0 on both sides).
    lp_j = mid["log_probs"][: S - 1].sum(-1)
    lp_t = nhwc(res.log_probs)[: S - 1].sum(-1)
    adv_p = np.clip(mid["maps"] * mid["advantages"][:, None, None], -c.adv_clip_max, c.adv_clip_max)
    min_std = float(np.min(np.std(mid["rewards"].reshape(-1, G), axis=1, ddof=1)))
    g_scale = max(float(np.max(np.abs(v))) for v in t_grads.values())
    # Gradients: worst leaf, each leaf against its own scale (leaves with a negligible gradient,
    # below 1e-3 of the largest, are compared against that floor instead).
    worst = max(((k, float(np.max(np.abs(j_grads[k] - v))), max(float(np.max(np.abs(v))), 1e-3 * g_scale))
                 for k, v in t_grads.items()), key=lambda kv: kv[1] / kv[2])
    dp_j = {k: j_params[k] - p0[k] for k in p0}
    dp_t = {k: t_params[k] - p0[k] for k in p0}
    # Adam's first step is lr*g/(|g|+eps): elements whose |g| is near eps turn float32 gradient
    # differences into a visible fraction of lr, so this is reported, not asserted.
    dp_err = max(float(np.max(np.abs(dp_j[k] - dp_t[k]))) for k in p0)
    dp_off = sum(int(np.sum(np.abs(dp_j[k] - dp_t[k]) > 1e-2 * lr)) for k in p0) / sum(v.size for v in p0.values())
    g_all_j = np.concatenate([v.ravel() for v in j_grads.values()])
    g_all_t = np.concatenate([t_grads[k].ravel() for k in j_grads])

    checks = [
        check("free-running rollout x_S (PyTorch samples with our SDE noise)", free_latents[-1],
              mid["latents"][-1], 1e-4, note="drift"),
        check("log-prob per transition and latent position", lp_t, lp_j, 1e-4, note=f"{S - 1} SDE steps"),
        check("final clean prediction x0", nhwc(res.x0), mid["x0"], 1e-4),
        check("decoded images", nhwc(res.images), mid["images"], 1e-4, scale=1.0),
        check(f"rewards ({reward_name})", res.rewards.numpy(), mid["rewards"], 1e-4),
        check("DINOv2 patch tokens", res.features.numpy(), mid["features"], 1e-4),
        check("PSM maps", res.maps.numpy(), mid["maps"], 1e-3, scale=1.0),
        check("group advantages from the same rewards", tr.group_advantages(torch.tensor(mid["rewards"]), G),
              mid["advantages"], 1e-5),
        # End to end, the float32 reward differences are divided by the group std (the rewards of
        # random weights differ little), hence the gradients' tolerance.
        check("group advantages", res.advantages.numpy(), mid["advantages"], 1e-3,
              note=f"reward spread: min group std {min_std:.1e}"),
        check("trained timesteps (fed)", res.timesteps.numpy(), mid["timesteps"], 0, scale=1.0, info=True),
        check("loss", res.loss, metrics["loss"], 1e-4, scale=max(abs(metrics["loss"]), float(np.mean(np.abs(adv_p)))),
              note="scale: max(|loss|, mean |A^p|)"),
        check("gradient global norm", res.grad_norm, metrics["grad_norm"], 1e-3),
        check("gradients, worst leaf", worst[1], 0.0, 1e-3, scale=worst[2], note=worst[0]),
        check("gradients, all leaves", g_all_t, g_all_j, 1e-3),
        check("parameter change after clip + AdamW", dp_err, 0.0, 1e-2, scale=lr, info=True,
              note=f"scale: lr; {100 * dp_off:.3f}% of elements off by > 1% of lr"),
        check("JAX: step vs its intermediates, mean reward", metrics[f"reward/{reward_name}"],
              float(np.mean(mid["rewards"])), 1e-5, scale=max(float(np.std(mid["rewards"])), 1e-6)),
        check("JAX: step vs its intermediates, mean PSM map", metrics["map/mean"], float(np.mean(mid["maps"])),
              1e-5, scale=1.0),
        Check("JAX: ratio - 1 before the first update", metrics["ratio_dev_first_update"], 1.0, 0.0),
        Check("JAX: rollout vs training log-prob gap", metrics["logp/rollout_gap"], 1.0, 1e-3, info=True),
        Check("PyTorch: ratio - 1 in the training pass", res.ratio_dev, 1.0, 0.0, info=True),
    ]
    return ParityResult(checks, compile_s)
