"""How well the PSM's map finds the subject in the toy world, per backbone, sign rule and smoothing.

    python benchmarks/psm_maps.py [--prompts 16] [--group 4] [--seed 0]

One batch like a training iteration of the embedded default (SDE samples of the committed toy
policy, the G samples of a prompt from one initial noise), its subject masks from the images
themselves (``vipo_jax.rewards.regions.subject_mask``, pooled to the 16x16 latent grid), and for
every setting the maps' AUC against those masks (per image, mean over images: 1 = the subject's
cells all weighted above the background's, 0.5 = no relation, 0 = inverted), the share of images
whose map favours the subject (AUC > 0.5), and how much each map is the batch's mean map (the
correlation of M_i with the batch mean: near 1, every image gets the same centre blob). For DINOv2
also the explained-variance ratio of the first principal component (PC1 dominating makes K = 1..5
indistinguishable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import flux  # noqa: E402
from vipo_jax import backbones, rl  # noqa: E402
from vipo_jax.backbones import BackboneContext  # noqa: E402
from vipo_jax.rewards.regions import subject_mask  # noqa: E402
from vipo_jax.toy import assets  # noqa: E402
from vipo_jax.training.step import repeat_groups  # noqa: E402
from vipo_jax.worlds import build_world  # noqa: E402

SETTINGS = [  # (label, backbone_kind, psm overrides)
    ("dinov2, border, sigma 1 (default)", "dinov2", {}),
    ("dinov2, border, sigma 0.5", "dinov2", {"smooth_sigma": 0.5}),
    ("dinov2, border, sigma 0", "dinov2", {"smooth_sigma": 0.0}),
    ("dinov2, sklearn_u", "dinov2", {"sign_rule": "sklearn_u"}),
    ("dinov2, sklearn_v (the official code)", "dinov2", {"sign_rule": "sklearn_v"}),
    ("dinov2, first_pc", "dinov2", {"aggregation": "first_pc"}),
    ("dinov2, average", "dinov2", {"aggregation": "average"}),
    ("dinov2, inverted control", "dinov2", {"control": "inverted"}),
    ("dinov2, mean_map control", "dinov2", {"control": "mean_map"}),
    ("pixels 4x4 patches, sigma 1", "pixels", {"patch": 4}),
    ("pixels 4x4 patches, sigma 0.5", "pixels", {"patch": 4, "smooth_sigma": 0.5}),
    ("pixels 8x8 patches, sigma 1", "pixels", {"patch": 8}),
    ("latents 1x1, sigma 1", "latents", {"patch": 1}),
    ("latents 1x1, sigma 0.5", "latents", {"patch": 1, "smooth_sigma": 0.5}),
]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUC (ties counted half); NaN without both classes."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def batch_samples(prompts: int, group: int, seed: int):
    c = flux.get_config("toy")
    world = build_world(c)
    table = world.train_prompts
    idx = np.random.default_rng(seed).choice(len(table), prompts, replace=False)
    cond = repeat_groups(table.rows(idx)["cond"], group)
    k_noise, k_sde = jax.random.split(jax.random.PRNGKey(seed))
    x = rl.initial_noise(k_noise, prompts, group, world.latent_shape)
    sigmas = rl.sigma_schedule(c.sampling.num_steps, c.sampling.shift)
    ro = jax.jit(lambda x: rl.rollout(lambda a, s, cc: world.velocity_fn(world.params, a, s, cc), x, cond, sigmas,
                                      c.sampling.eta, k_sde))(x)
    images = jax.jit(world.decode_fn)(world.frozen, ro["x0"])
    return c, world, np.asarray(images), np.asarray(ro["x0"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    c, world, images, x0 = batch_samples(a.prompts, a.group, a.seed)
    h, w = world.latent_shape[:2]
    fg_px = np.asarray(subject_mask(images))
    fy, fx = images.shape[1] // h, images.shape[2] // w
    fg = fg_px.reshape(len(images), h, fy, w, fx).mean((2, 4)) > 0.5
    print(f"{len(images)} samples ({a.prompts} prompts x G {a.group}) of the toy policy, latent grid {h}x{w}; "
          f"subject cells {100 * fg.mean():.0f}% of the grid")
    rows = []
    for label, kind, over in SETTINGS:
        cc = c.copy_and_resolve_references()
        cc.psm.backbone_kind = kind
        for k, v in over.items():
            cc.psm[k] = v
        loaded = backbones.get(kind).load(BackboneContext(cc, "toy", toy_assets=assets.assets_dir()))
        opts = rl.PSMOptions.from_any(cc.psm)
        source = x0 if backbones.get(kind).reads == "latents" else images
        feats = jax.jit(loaded.features)(loaded.params, jnp.asarray(source))
        maps = np.asarray(rl.control_map(rl.psm_map(feats, (h, w), opts), opts.control, a.group))
        aucs = np.array([auc(m.ravel(), f.ravel()) for m, f in zip(maps, fg)])
        mean_map = maps.mean(0).ravel()
        corr = np.nanmean([np.corrcoef(m.ravel(), mean_map)[0, 1] if m.std() > 0 else np.nan for m in maps])
        pc1 = ""
        if kind == "dinov2":
            f = np.asarray(feats, np.float64).reshape(len(images), -1, feats.shape[-1])
            f = f - f.mean(1, keepdims=True)
            s = np.linalg.svd(f, compute_uv=False) ** 2
            pc1 = f"{np.mean(s[:, 0] / s.sum(1)):.2f}"
        rows.append((label, np.nanmean(aucs), np.mean(aucs > 0.5), corr, pc1, feats.shape[1:]))
    print("\n| map | AUC vs subject | images favouring the subject | corr. with batch-mean map | PC1 share | "
          "feature grid |\n|---|---|---|---|---|---|")
    for label, m_auc, share, corr, pc1, grid in rows:
        print(f"| {label} | {m_auc:.3f} | {100 * share:.0f}% | {corr:.2f} | {pc1} | {grid[0]}x{grid[1]}x{grid[2]} |")


if __name__ == "__main__":
    main()
