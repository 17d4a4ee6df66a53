"""Our jitted ViPO iteration against a PyTorch one organised like the reference scripts: parity, then speed.

    python benchmarks/vs_pytorch.py [--size bench|test] [--repeats 5] [--skip-speed | --skip-parity] [--threads 2,1]

Both sides run the same models: tiny random diffusers ``FluxTransformer2DModel`` / ``AutoencoderKL``
and transformers ``Dinov2Model`` (norm scales randomised), saved with ``save_pretrained`` and loaded
into ours with our loaders. The PyTorch iteration is ``benchmarks/torch_iteration.py`` (a loop over
samples and sampling steps, DanceGRPO's ``flux_step``, per-sample decode / redness reward / PSM,
group advantages, a separate forward + ``backward()`` per sample and trained timestep, one clipped
AdamW step). Ours is ``vipo_jax.training.step.make_train_step`` on a world made of our ports, plus
the same ``vipo_jax.rl`` functions jitted once more to expose the intermediates the step does not
return (rollout latents, SDE noise, log-probs, images, features, maps, advantages, timesteps).

Parity: the PyTorch side is fed our initial noise, SDE noise, trajectory (each transition's
log-prob is evaluated on our ``x_t -> x_{t+1}``, as a training pass does) and trained timesteps;
everything downstream (x0, images, rewards, DINOv2 features, PSM maps, advantages, loss, gradients,
parameters after AdamW) it computes itself. The gradients of the jitted step are read back through
an optax transformation that keeps them in the optimizer state; PyTorch's are mapped into our
parameter layout with our own converter (a linear re-arrangement). Exit status 1 if a check fails.

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
import dataclasses  # noqa: E402
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
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import torch_iteration as ti  # noqa: E402
from vipo_jax import rl  # noqa: E402
from vipo_jax.models.dinov2 import load_dinov2, patch_tokens, preprocess  # noqa: E402
from vipo_jax.models.flux import convert_diffusers, load_flux_transformer  # noqa: E402
from vipo_jax.models.vae import decode_to_unit, load_vae  # noqa: E402
from vipo_jax.toy import sizes as toy_sizes  # noqa: E402
from vipo_jax.toy.rewards import redness  # noqa: E402
from vipo_jax.training.run import init_state  # noqa: E402
from vipo_jax.training.step import StepConfig, make_train_step, repeat_groups  # noqa: E402
from vipo_jax.worlds.flux_policy import flux_velocity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-5, (0.9, 0.999), 1e-8, 1e-4, 1.0

# ------------------------------------------------------------------------------------------------
# Sizes. "bench" is the toy world's models (vipo_jax/toy/sizes.py) at 64^2 (16x16x4 latent, 8x8 DINOv2
# patches), 8 sampling steps, 2 prompts x G=4; "test" is the smallest that keeps every code path.

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
GUIDANCE = 3.5


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


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Reference inits leave norm scales at 1 and shifts at 0: randomise them, so that a norm
    mapped to the wrong place shows in the parity check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                base = 1.0 if name.endswith((".weight", ".scale")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------
# The two worlds.


@dataclasses.dataclass
class World:
    size: dict[str, Any]
    step_cfg: StepConfig
    torch_cfg: ti.TorchConfig
    latent_shape: tuple[int, int, int]  # ours: (H, W, C)
    # PyTorch
    t_flux: torch.nn.Module
    t_vae: torch.nn.Module
    t_dino: torch.nn.Module
    t_t5: torch.Tensor
    t_pooled: torch.Tensor
    # JAX
    flux_cfg: Any
    graphdefs: dict[str, Any]
    params: Any
    frozen: dict[str, Any]
    batch: dict[str, Any]

    def velocity_fn(self, p, x, sigma, cond):
        g = jnp.full((x.shape[0],), GUIDANCE, jnp.float32)
        return flux_velocity(nnx.merge(self.graphdefs["flux"], p), x, sigma, cond["t5"], cond["pooled"], g)

    def decode_fn(self, frozen, x0):
        return decode_to_unit(nnx.merge(self.graphdefs["vae"], frozen["vae"]), x0)

    def feature_fn(self, frozen, images):
        dino = nnx.merge(self.graphdefs["dino"], frozen["dino"])
        return patch_tokens(dino, preprocess(images, images.shape[1:3], patch_size=dino.config.patch_size))[0]

    @property
    def reward_fns(self) -> dict[str, Callable]:
        return {"redness": lambda frozen, images, batch: redness(images)}

    def train_step(self, optimizer: optax.GradientTransformation, cfg: StepConfig | None = None) -> Callable:
        return make_train_step(cfg or self.step_cfg, velocity_fn=self.velocity_fn, decode_fn=self.decode_fn,
                               reward_fns=self.reward_fns, feature_fn=self.feature_fn, optimizer=optimizer,
                               latent_shape=self.latent_shape)

    def torch_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.t_flux.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def build_world(size_name: str, tmp: Path) -> World:
    """Random reference models, saved by their libraries and loaded into ours by our loaders."""
    import diffusers
    import transformers

    sz = SIZES[size_name]
    torch.manual_seed(0)
    t_flux = diffusers.FluxTransformer2DModel(**sz["dit"])
    perturb_norms(t_flux, 1)
    t_vae = diffusers.AutoencoderKL(**sz["vae"]).eval()
    perturb_norms(t_vae, 2)
    t_dino = transformers.Dinov2Model(transformers.Dinov2Config(**sz["dino"])).eval()
    perturb_norms(t_dino, 3)
    t_flux.save_pretrained(tmp / "transformer", safe_serialization=True)
    t_vae.save_pretrained(tmp / "vae", safe_serialization=True)
    t_dino.save_pretrained(tmp / "dinov2")
    flux, vae, dino = load_flux_transformer(tmp / "transformer"), load_vae(tmp / "vae"), load_dinov2(tmp / "dinov2")

    graphdefs, frozen = {}, {}
    graphdefs["flux"], params = nnx.split(flux)
    graphdefs["vae"], frozen["vae"] = nnx.split(vae)
    graphdefs["dino"], frozen["dino"] = nnx.split(dino)
    f = vae.cfg.downsample_factor
    latent_shape = (sz["image"] // f, sz["image"] // f, vae.cfg.latent_channels)

    rng = np.random.default_rng(0)
    t5 = rng.standard_normal((sz["prompts"], sz["text_len"], sz["dit"]["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((sz["prompts"], sz["dit"]["pooled_projection_dim"])).astype(np.float32)
    step_cfg = StepConfig(num_steps=sz["steps"], shift=3.0, eta=0.3, group_size=sz["group"],
                          rewards=(("redness", 1.0),))
    torch_cfg = ti.TorchConfig(num_steps=step_cfg.num_steps, shift=step_cfg.shift, eta=step_cfg.eta,
                               group_size=step_cfg.group_size, timestep_fraction=step_cfg.timestep_fraction,
                               clip_range=step_cfg.clip_range, adv_clip_max=step_cfg.adv_clip_max,
                               logprob_reduction=step_cfg.logprob_reduction,
                               psm_num_components=step_cfg.psm_num_components,
                               psm_smooth_sigma=step_cfg.psm_smooth_sigma, guidance=GUIDANCE, grad_clip=GRAD_CLIP)
    return World(size=sz, step_cfg=step_cfg, torch_cfg=torch_cfg, latent_shape=latent_shape, t_flux=t_flux,
                 t_vae=t_vae, t_dino=t_dino, t_t5=torch.from_numpy(t5), t_pooled=torch.from_numpy(pooled),
                 flux_cfg=flux.cfg, graphdefs=graphdefs, params=params, frozen=frozen,
                 batch={"cond": {"t5": jnp.asarray(t5), "pooled": jnp.asarray(pooled)}})


def intermediates_fn(w: World) -> Callable:
    """The step's rollout -> decode -> reward -> PSM -> advantages -> timesteps with the same
    ``vipo_jax.rl`` calls and the same keys (``training/step.py`` splits the state's RNG into
    ``(next, noise, sde, timesteps)``), returning what the step keeps to itself."""
    c = w.step_cfg
    sigmas = rl.sigma_schedule(c.num_steps, c.shift)

    def run(params, frozen, batch, key):
        _, k_noise, k_sde, k_ts = jax.random.split(key, 4)
        P = batch["cond"]["t5"].shape[0]
        B = P * c.group_size
        cond = repeat_groups(batch["cond"], c.group_size)
        x_init = rl.initial_noise(k_noise, P, c.group_size, w.latent_shape)
        ro = rl.rollout(lambda x, s, cc: w.velocity_fn(params, x, s, cc), x_init, cond, sigmas, c.eta, k_sde,
                        return_noise=True)
        images = w.decode_fn(frozen, ro["x0"])
        rewards = redness(images)
        feats = w.feature_fn(frozen, images)
        maps = rl.psm_map(feats, w.latent_shape[:2], c.psm_options())
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


def reference_optimizer() -> optax.GradientTransformation:
    """The recipe's AdamW with grad-norm clipping (``vipo_jax.training.run.make_optimizer``)."""
    return optax.chain(optax.clip_by_global_norm(GRAD_CLIP),
                       optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY))


def flat(state: Any) -> dict[str, np.ndarray]:
    """nnx State -> {dotted path: array}, the keys of our weight converters."""
    return {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(state)}


def torch_as_ours(w: World, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """diffusers-named tensors (gradients or parameters) -> our layout, by our checkpoint converter."""
    return convert_diffusers({k: v.detach().numpy() for k, v in tensors.items()}, w.flux_cfg, where="torch tensors")


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


def _check(name: str, ours: Any, ref: Any, tol: float, scale: float | None = None, note: str = "",
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


def run_parity(w: World, seed: int = 0, log: Callable[[str], None] = print) -> ParityResult:
    """One iteration on both sides from the same parameters and randomness; see the module docstring."""
    c = w.step_cfg
    S = c.num_steps
    t0 = time.perf_counter()
    mid = jax.tree.map(np.asarray, jax.jit(intermediates_fn(w))(w.params, w.frozen, w.batch, jax.random.PRNGKey(seed)))
    opt = optax.chain(capture_grads(), reference_optimizer())
    state = init_state(jax.tree.map(jnp.array, w.params), opt, seed)  # a copy: the step donates it
    step = jax.jit(w.train_step(opt), donate_argnums=0)
    state, metrics = step(state, w.frozen, w.batch)
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
    sigmas = ti.sigma_schedule(S, c.shift)
    noise = nchw(mid["noise"])
    G = c.group_size
    free = [ti.rollout_sample(w.t_flux, x_init[i:i + 1], w.t_t5[i // G:i // G + 1], w.t_pooled[i // G:i // G + 1],
                              sigmas, w.torch_cfg, noise=noise[:, i:i + 1])[0] for i in range(x_init.shape[0])]
    free_latents = nhwc(torch.cat(free, dim=1))
    # PyTorch: fed our noise, trajectory and timesteps; computes everything downstream itself.
    fixed = ti.Fixed(x_init=x_init, latents=nchw(mid["latents"]),
                     timesteps=torch.from_numpy(mid["timesteps"].astype(np.int64)))
    res = ti.iteration(w.t_flux, w.t_vae, w.t_dino, w.torch_optimizer(), w.torch_cfg, w.t_t5, w.t_pooled,
                       (w.latent_shape[2],) + w.latent_shape[:2], fixed=fixed)
    log(f"  PyTorch free rollout + iteration: {time.perf_counter() - t0:.1f} s")

    t_grads = torch_as_ours(w, res.grads)
    t_params = torch_as_ours(w, dict(w.t_flux.named_parameters()))
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
    dp_off = sum(int(np.sum(np.abs(dp_j[k] - dp_t[k]) > 1e-2 * LR)) for k in p0) / sum(v.size for v in p0.values())
    g_all_j = np.concatenate([v.ravel() for v in j_grads.values()])
    g_all_t = np.concatenate([t_grads[k].ravel() for k in j_grads])

    checks = [
        _check("free-running rollout x_S (PyTorch samples with our SDE noise)", free_latents[-1],
               mid["latents"][-1], 1e-4, note="drift"),
        _check("log-prob per transition and latent position", lp_t, lp_j, 1e-4, note=f"{S - 1} SDE steps"),
        _check("final clean prediction x0", nhwc(res.x0), mid["x0"], 1e-4),
        _check("decoded images", nhwc(res.images), mid["images"], 1e-4, scale=1.0),
        _check("rewards (redness)", res.rewards.numpy(), mid["rewards"], 1e-4),
        _check("DINOv2 patch tokens", res.features.numpy(), mid["features"], 1e-4),
        _check("PSM maps", res.maps.numpy(), mid["maps"], 1e-3, scale=1.0),
        _check("group advantages from the same rewards", ti.group_advantages(torch.tensor(mid["rewards"]), G),
               mid["advantages"], 1e-5),
        # End to end, the float32 reward differences are divided by the group std (the rewards of
        # random weights differ little), hence the gradients' tolerance.
        _check("group advantages", res.advantages.numpy(), mid["advantages"], 1e-3,
               note=f"reward spread: min group std {min_std:.1e}"),
        _check("trained timesteps (fed)", res.timesteps.numpy(), mid["timesteps"], 0, scale=1.0, info=True),
        _check("loss", res.loss, metrics["loss"], 1e-4, scale=max(abs(metrics["loss"]), float(np.mean(np.abs(adv_p)))),
               note="scale: max(|loss|, mean |A^p|)"),
        _check("gradient global norm", res.grad_norm, metrics["grad_norm"], 1e-3),
        _check("gradients, worst leaf", worst[1], 0.0, 1e-3, scale=worst[2], note=worst[0]),
        _check("gradients, all leaves", g_all_t, g_all_j, 1e-3),
        _check("parameter change after clip + AdamW", dp_err, 0.0, 1e-2, scale=LR, info=True,
               note=f"scale: lr; {100 * dp_off:.3f}% of elements off by > 1% of lr"),
        _check("JAX: step vs its intermediates, mean reward", metrics["reward/redness"],
               float(np.mean(mid["rewards"])), 1e-5, scale=max(float(np.std(mid["rewards"])), 1e-6)),
        _check("JAX: step vs its intermediates, mean PSM map", metrics["map/mean"], float(np.mean(mid["maps"])),
               1e-5, scale=1.0),
        Check("JAX: ratio - 1 before the first update", metrics["ratio_dev_first_update"], 1.0, 0.0),
        Check("JAX: rollout vs training log-prob gap", metrics["logp/rollout_gap"], 1.0, 1e-3, info=True),
        Check("PyTorch: ratio - 1 in the training pass", res.ratio_dev, 1.0, 0.0, info=True),
    ]
    return ParityResult(checks, compile_s)


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


def run_speed(w: World, repeats: int, threads: tuple[int, ...], log: Callable[[str], None] = print) -> str:
    """Times one iteration of each side (PyTorch once per intra-op thread count in ``threads``)."""
    c = w.step_cfg
    G, S = c.group_size, c.num_steps
    P = w.batch["cond"]["t5"].shape[0]
    opt = reference_optimizer()
    step = w.train_step(opt)
    state = init_state(jax.tree.map(jnp.array, w.params), opt, 1)

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, w.frozen, w.batch)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla_flops = float((ca or {}).get("flops", float("nan")))
    jaxpr_flops, whiles = matmul_flops(jax.make_jaxpr(step)(state, w.frozen, w.batch).jaxpr)

    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], w.frozen, w.batch)
        return m

    jax.block_until_ready(one_step())  # warm-up
    log(f"  JAX step compiled in {t_lower + t_compile:.1f} s")

    # Phases, jitted separately at the step's shapes (as benchmarks/step_breakdown.py).
    sigmas = rl.sigma_schedule(S, c.shift)
    cond = repeat_groups(w.batch["cond"], G)
    params = jax.tree.map(jnp.array, holder["state"]["params"])  # a copy: the step donates its state
    rollout = jax.jit(lambda p, k: rl.rollout(lambda x, s, cc: w.velocity_fn(p, x, s, cc),
                                              rl.initial_noise(k, P, G, w.latent_shape), cond, sigmas, c.eta, k))
    key = jax.random.PRNGKey(0)
    ro = rollout(params, key)
    decode = jax.jit(w.decode_fn)
    images = decode(w.frozen, ro["x0"])
    reward = jax.jit(lambda im: rl.group_advantages(redness(im), G))
    psm = jax.jit(lambda f, im: rl.psm_map(w.feature_fn(f, im), w.latent_shape[:2], c.psm_options()))
    jax_phases = {"rollout": lambda: rollout(params, key), "decode": lambda: decode(w.frozen, ro["x0"]),
                  "reward + advantages": lambda: reward(images), "psm": lambda: psm(w.frozen, images)}
    for fn in jax_phases.values():
        jax.block_until_ready(fn())

    topt = w.torch_optimizer()
    gen = torch.Generator().manual_seed(0)
    lshape = (w.latent_shape[2],) + w.latent_shape[:2]

    def torch_iteration() -> ti.IterationResult:
        return ti.iteration(w.t_flux, w.t_vae, w.t_dino, topt, w.torch_cfg, w.t_t5, w.t_pooled, lshape, generator=gen)

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
    d = w.size["dit"]
    n_img, width = w.latent_shape[0] * w.latent_shape[1] // 4, d["num_attention_heads"] * d["attention_head_dim"]
    medians = ", ".join([f"JAX {1e3 * med['jax step']:.0f} ms"]
                        + [f"PyTorch ({n} thr.) {1e3 * med[f'torch{n} step']:.0f} ms" for n in threads])
    lines = [f"Iteration: {P} prompts x G={G}, {S} sampling steps, {K} trained per sample, latent "
             f"{w.latent_shape}, image {w.size['image']}^2, DiT width {width} x {d['num_layers']}+"
             f"{d['num_single_layers']} blocks over {n_img}+{w.size['text_len']} tokens; "
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
            w = build_world(args.size, Path(tmp) / "parity")
            parity = run_parity(w, log=log)
            print(f"\nParity ({args.size}: {w.size['prompts']} prompts x G={w.step_cfg.group_size}, "
                  f"{w.step_cfg.num_steps} steps, latent {w.latent_shape}):\n")
            print(parity.table(), flush=True)
        if not args.skip_speed:
            w = build_world(args.size, Path(tmp) / "speed")  # fresh weights (parity took an AdamW step)
            print("\nSpeed:\n")
            print(run_speed(w, args.repeats, threads, log=log))
    if parity is not None and not parity.ok:
        print("\nParity FAILED: " + ", ".join(c.name for c in parity.checks if not c.ok))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
