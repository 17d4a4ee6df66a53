"""One ViPO iteration in PyTorch, organised like the reference scripts (DanceGRPO's
``train_grpo_flux.py`` and the official ViPO release built on it): the reference against which
:mod:`pytorch_reference.parity` (``tests/test_vs_pytorch.py``, ``benchmarks/vs_pytorch.py``) checks
and times our jitted step. For the tests and benchmarks only.

The organisation is the point, so it is kept: a Python loop over samples (batch 1) and over
sampling steps under ``no_grad``, DanceGRPO's ``flux_step`` (SDE step and its element-wise
Gaussian log-prob), decode, reward and PSM per sample, group advantages, then for every sample and
every trained timestep a separate forward and ``loss.backward()`` (gradient accumulation), one
grad-norm clip and one AdamW step. Differences from the references, all deliberate: float32
everywhere (they autocast to bf16 on GPU), the model sees the exact sigma (DanceGRPO quantises it
to ``int(sigma*1000)/1000``), the last transition to sigma=0 is the deterministic ODE step as in
our rollout, and one optimizer step per iteration (``grad_accum`` = every sample).

For the parity check the randomness can be fed in (:class:`Fixed`): the initial noise, the SDE
noise, the trajectory itself (``latents``: each transition's log-prob is then evaluated on the
given ``x_t -> x_{t+1}``, as DanceGRPO's training pass does with ``prev_sample``) and the trained
timesteps. Tensors are NCHW; PSM maps are (B, H, W) on the latent grid.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TorchConfig:
    """The RL hyper-parameters of one iteration (the names of ``vipo_jax.training.step_config.StepConfig``)."""

    num_steps: int
    shift: float
    eta: float
    group_size: int
    timestep_fraction: float = 0.6
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    logprob_reduction: str = "position_sum"  # or "sample_mean" (DanceGRPO / the released Flux script)
    psm_enabled: bool = True
    psm_num_components: int = 3
    psm_smooth_sigma: float = 1.0
    guidance: float | None = 3.5
    grad_clip: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int((self.num_steps - 1) * self.timestep_fraction)

    @classmethod
    def from_step(cls, step: Any, *, guidance: float | None, grad_clip: float) -> TorchConfig:
        """The settings of a ``vipo_jax.training.step_config.StepConfig`` (``guidance``: the world's
        ``options.guidance``; ``grad_clip``: ``config.optim.grad_clip``). Raises ValueError for what
        this reference does not implement (several updates, rewards other than redness, PSM variants
        other than the paper's border sign rule and weighted aggregation)."""
        psm = step.psm
        unsupported = []
        if step.num_updates != 1:
            unsupported.append(f"num_updates={step.num_updates}")
        if step.map_target != "advantage":
            unsupported.append(f"map_target={step.map_target!r}")
        if not step.init_same_noise:
            unsupported.append("init_same_noise=False")
        if [name for name, _ in step.rewards] != ["redness"]:
            unsupported.append(f"rewards={step.rewards} (only redness)")
        if psm is not None and (psm.sign_rule, psm.aggregation, psm.normalize_mean) != ("border", "weighted", False):
            unsupported.append(f"psm={psm}")
        if unsupported:
            raise ValueError("the PyTorch reference iteration does not implement " + ", ".join(unsupported))
        return cls(num_steps=step.num_steps, shift=step.shift, eta=step.eta, group_size=step.group_size,
                   timestep_fraction=step.timestep_fraction, clip_range=step.clip_range,
                   adv_clip_max=step.adv_clip_max, logprob_reduction=step.logprob_reduction,
                   psm_enabled=psm is not None, psm_num_components=psm.num_components if psm else 3,
                   psm_smooth_sigma=psm.smooth_sigma if psm else 1.0, guidance=guidance, grad_clip=grad_clip)


@dataclass
class Fixed:
    """Inputs taken from the other implementation (parity mode); ``None`` fields are drawn here."""

    x_init: torch.Tensor | None = None  # (B, C, H, W)
    noise: torch.Tensor | None = None  # (S, B, C, H, W) SDE noise per step
    latents: torch.Tensor | None = None  # (S+1, B, C, H, W) trajectory to evaluate instead of sampling
    timesteps: torch.Tensor | None = None  # (B, K) trained transition indices


@dataclass
class IterationResult:
    latents: torch.Tensor  # (S+1, B, C, H, W)
    log_probs: torch.Tensor  # (S, B, C, H, W) element-wise, from the rollout pass
    x0: torch.Tensor  # (B, C, H, W) final clean prediction
    images: torch.Tensor  # (B, 3, H_img, W_img) in [0, 1]
    rewards: torch.Tensor  # (B,)
    features: torch.Tensor | None  # (B, h, w, D) DINOv2 patch tokens
    maps: torch.Tensor  # (B, H, W) PSM maps (ones without the PSM)
    advantages: torch.Tensor  # (B,)
    timesteps: torch.Tensor  # (B, K)
    loss: float  # sum of the accumulated per-(sample, timestep) losses = the mean loss
    grad_norm: float  # before clipping
    grads: dict[str, torch.Tensor]  # accumulated gradients before clipping
    ratio_dev: float  # max |ratio - 1| over the training pass (0 when rollout and training agree)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase


# --------------------------------------------------------------------------- sampler
def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """DanceGRPO's ``sd3_time_shift`` of ``linspace(1, 0, S+1)`` (computed in float64, kept in float32)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1.0 + (shift - 1.0) * u)).to(torch.float32)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, 4C): 2x2 patches, channels (c, dy, dx), tokens row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h/2*w/2, 3) position ids (0, row, col) of the packed latent tokens."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(torch.float32)


def velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, t5: torch.Tensor,
             pooled: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """The DiT's velocity for NCHW latents; the transformer multiplies sigma (and guidance) by 1000."""
    b, _, h, w = x.shape
    g = None if guidance is None else torch.full((b,), guidance, dtype=torch.float32)
    out = transformer(hidden_states=pack(x), encoder_hidden_states=t5, pooled_projections=pooled,
                      timestep=sigma.expand(b), img_ids=image_ids(h, w), txt_ids=torch.zeros(t5.shape[1], 3),
                      guidance=g, return_dict=False)[0]
    return unpack(out.float(), h, w)


def flux_step(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float, *,
              noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DanceGRPO's ``flux_step``: returns ``(x_next, element-wise log-prob, x0 prediction)``.

    ``x_next`` given: its log-prob under the step's Gaussian (the training pass); otherwise it is
    sampled with ``noise`` (or fresh noise). ``eta == 0`` is the ODE step, with log-prob 0."""
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - (1.0 - sigma) * x0) / sigma ** 2
    mean = x + dsigma * v - 0.5 * eta ** 2 * score * dsigma
    std = eta * torch.sqrt(sigma - sigma_next)
    if eta == 0:
        return (mean if x_next is None else x_next), torch.zeros_like(mean), x0
    if x_next is None:
        x_next = mean + std * (torch.randn_like(mean) if noise is None else noise)
    x_next = x_next.detach()
    logp = -((x_next - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return x_next, logp, x0


@torch.no_grad()
def rollout_sample(transformer: torch.nn.Module, x: torch.Tensor, t5: torch.Tensor, pooled: torch.Tensor,
                   sigmas: torch.Tensor, cfg: TorchConfig, *, noise: torch.Tensor | None = None,
                   forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample (batch 1), all sampling steps: ``(latents (S+1,1,C,H,W), log-probs (S,1,C,H,W), x0)``.

    SDE steps with ``cfg.eta`` except the last (ODE). ``forced`` (S+1,1,C,H,W): evaluate that
    trajectory instead of sampling one; ``noise`` (S,1,C,H,W): the SDE noise to sample with."""
    s = cfg.num_steps
    latents, logps = [x], []
    x0 = x
    for j in range(s):
        v = velocity(transformer, x, sigmas[j], t5, pooled, cfg.guidance)
        eta = cfg.eta if j < s - 1 else 0.0
        given = None if forced is None else forced[j + 1]
        x, lp, x0 = flux_step(v, x, sigmas[j], sigmas[j + 1], eta,
                              noise=None if noise is None else noise[j], x_next=given)
        latents.append(x)
        logps.append(lp)
    return torch.stack(latents), torch.stack(logps), x0


# --------------------------------------------------------------------------- decode, reward, PSM
@torch.no_grad()
def decode(vae: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Model latents -> images in [0, 1] (``z / scaling + shift`` as the Flux pipeline)."""
    c = vae.config
    z = x0 / c.scaling_factor + (c.shift_factor or 0.0)
    return ((vae.decode(z, return_dict=False)[0] + 1.0) * 0.5).clamp(0.0, 1.0)


def redness(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) mean of R - (G + B) / 2."""
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))


@torch.no_grad()
def dino_patch_tokens(dino: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's last layer-normed patch tokens (CLS and registers dropped) as a (B, h, w, D) grid;
    input at the generation resolution rounded to the patch size, ImageNet normalisation."""
    p = dino.config.patch_size
    h, w = (max(p, round(s / p) * p) for s in images.shape[-2:])
    if (h, w) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = dino(pixel_values=(images - mean) / std).last_hidden_state
    skip = 1 + getattr(dino.config, "num_register_tokens", 0)
    return out[:, skip:].reshape(images.shape[0], h // p, w // p, out.shape[-1])


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """scipy.ndimage 'reflect' boundary (d c b a | a b c d | d c b a) as source indices."""
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian_filter_2d(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy ``gaussian_filter(x, sigma)`` for a 2-D tensor: separable, reflect boundaries."""
    if sigma <= 0:
        return x
    r = int(truncate * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    for axis in (0, 1):
        n = x.shape[axis]
        idx = _reflect(torch.arange(-r, n + r), n)
        xp = x.index_select(axis, idx).movedim(axis, -1)  # (other, n + 2r)
        x = F.conv1d(xp.reshape(-1, 1, n + 2 * r), k.view(1, 1, -1)).reshape(xp.shape[:-1] + (n,)).movedim(-1, axis)
    return x


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


@torch.no_grad()
def psm_map(features: torch.Tensor, latent_hw: tuple[int, int], num_components: int = 3,
            smooth_sigma: float = 1.0) -> torch.Tensor:
    """docs/METHOD.md §3 for one image: (h, w, D) patch tokens -> (H, W) map in [0, 1].

    PCA by SVD of the centred tokens; each component oriented so that its mean score on the grid
    border is positive ('border' rule); reverse min-max of each component, summed with weights =
    explained-variance ratios; Gaussian smoothing; min-max; antialiased bilinear to the latent
    grid; min-max."""
    h, w, d = features.shape
    f = features.reshape(h * w, d).float()
    xc = f - f.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    k = num_components
    z = (u[:, :k] * s[:k]).T  # (K, N) scores
    lam = s[:k] ** 2 / (xc ** 2).sum()
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    sign = torch.where(z[:, border.reshape(-1)].sum(dim=1) < 0, -1.0, 1.0)
    z = z * sign[:, None]
    zmax, zmin = z.max(dim=1, keepdim=True).values, z.min(dim=1, keepdim=True).values
    rev = (zmax - z) / (zmax - zmin)
    m = (lam[:, None] * rev).sum(dim=0).clamp(0.0, 1.0).reshape(h, w)
    m = _minmax(gaussian_filter_2d(m, smooth_sigma))
    m = F.interpolate(m[None, None], size=tuple(latent_hw), mode="bilinear", align_corners=False, antialias=True)
    return _minmax(m[0, 0])


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(r - mean_g) / (std_g + 1e-8)`` per group of G consecutive samples (unbiased std)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-8)).reshape(-1)


# --------------------------------------------------------------------------- the iteration
@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the block to ``times[name]`` (phases recur once per sample)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] += time.perf_counter() - t0


def iteration(transformer: torch.nn.Module, vae: torch.nn.Module, dino: torch.nn.Module | None,
              optimizer: torch.optim.Optimizer, cfg: TorchConfig, t5: torch.Tensor, pooled: torch.Tensor,
              latent_shape: tuple[int, int, int], fixed: Fixed | None = None,
              generator: torch.Generator | None = None) -> IterationResult:
    """One ViPO iteration for ``P`` prompts (``t5`` (P, L, D), ``pooled`` (P, D)) x G samples each.

    ``latent_shape`` is one sample's (C, H, W). ``fixed`` supplies the randomness / trajectory
    (parity mode); otherwise the noise is drawn from ``generator`` (all G samples of a prompt share
    the initial noise) and each sample trains a random subset of K of the first S-1 transitions."""
    fixed = fixed or Fixed()
    times: dict[str, float] = defaultdict(float)
    G, S, K = cfg.group_size, cfg.num_steps, cfg.num_train_timesteps
    P = t5.shape[0]
    B = P * G
    sigmas = sigma_schedule(S, cfg.shift)
    if fixed.x_init is not None:
        x_init = fixed.x_init
    else:
        x_init = torch.randn((P, 1) + tuple(latent_shape), generator=generator).expand(P, G, *latent_shape)
        x_init = x_init.reshape((B,) + tuple(latent_shape))

    # --- sampling: one sample at a time, then decode, reward, PSM per sample ------------------
    transformer.eval()
    lat, logps, x0s, images, rewards, feats, maps = [], [], [], [], [], [], []
    for i in range(B):
        p = i // G
        with _timed(times, "rollout"):
            noise = None if fixed.noise is None else fixed.noise[:, i:i + 1]
            if noise is None and fixed.latents is None:
                noise = torch.randn((S, 1) + tuple(latent_shape), generator=generator)
            forced = None if fixed.latents is None else fixed.latents[:, i:i + 1]
            la, lp, x0 = rollout_sample(transformer, x_init[i:i + 1], t5[p:p + 1], pooled[p:p + 1], sigmas, cfg,
                                        noise=noise, forced=forced)
        lat.append(la)
        logps.append(lp)
        x0s.append(x0)
        with _timed(times, "decode"):
            img = decode(vae, x0)
        images.append(img)
        with _timed(times, "reward"):
            rewards.append(redness(img))
        if cfg.psm_enabled and dino is not None:
            with _timed(times, "psm"):
                f = dino_patch_tokens(dino, img)
                feats.append(f)
                maps.append(psm_map(f[0], latent_shape[1:], cfg.psm_num_components, cfg.psm_smooth_sigma))
        else:
            maps.append(torch.ones(latent_shape[1:]))
    latents = torch.cat(lat, dim=1)  # (S+1, B, C, H, W)
    old_logp = torch.cat(logps, dim=1)  # (S, B, C, H, W)
    rewards_t = torch.cat(rewards)
    maps_t = torch.stack(maps)
    with _timed(times, "advantages"):
        adv = group_advantages(rewards_t, G)
        if fixed.timesteps is not None:
            ts = fixed.timesteps
        else:
            ts = torch.stack([torch.randperm(S - 1, generator=generator)[:K] for _ in range(B)])

    # --- training: a forward + backward per sample and trained timestep --------------------------
    with _timed(times, "train"):
        transformer.train()
        optimizer.zero_grad(set_to_none=True)
        total, ratio_dev = 0.0, 0.0
        for i in range(B):
            p = i // G
            for k in range(K):
                t = int(ts[i, k])
                x, x_next = latents[t, i:i + 1], latents[t + 1, i:i + 1]
                v = velocity(transformer, x, sigmas[t], t5[p:p + 1], pooled[p:p + 1], cfg.guidance)
                _, logp, _ = flux_step(v, x, sigmas[t], sigmas[t + 1], cfg.eta, x_next=x_next)
                old = old_logp[t, i:i + 1]
                if cfg.logprob_reduction == "position_sum":
                    lp_new, lp_old = logp.sum(dim=1), old.sum(dim=1)  # (1, H, W)
                else:  # sample_mean
                    lp_new, lp_old = logp.mean(dim=(1, 2, 3)), old.mean(dim=(1, 2, 3))
                ratio = torch.exp(lp_new - lp_old)
                # per-position advantage; with sample_mean the one ratio meets every position's A^p
                a = (adv[i] * maps_t[i:i + 1]).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
                unclipped = -a * ratio
                clipped = -a * ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
                loss = torch.maximum(unclipped, clipped).mean() / (B * K)
                loss.backward()
                total += float(loss.detach())
                ratio_dev = max(ratio_dev, float((ratio.detach() - 1.0).abs().max()))
        params = [q for q in transformer.parameters() if q.requires_grad]
        grads = {n: (q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q))
                 for n, q in transformer.named_parameters() if q.requires_grad}
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return IterationResult(latents=latents, log_probs=old_logp, x0=torch.cat(x0s), images=torch.cat(images),
                           rewards=rewards_t, features=torch.cat(feats) if feats else None, maps=maps_t,
                           advantages=adv, timesteps=ts, loss=total, grad_norm=gnorm, grads=grads,
                           ratio_dev=ratio_dev, phases=dict(times))
