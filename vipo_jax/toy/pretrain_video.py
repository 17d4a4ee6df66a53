"""Pretrain the video toy world (moving digits, Wan2.1 classes) on 2 CPU cores:
``python -m vipo_jax.toy.pretrain_video --out=DIR`` (default: the committed ``vipo_jax/toy/assets/video``).

Stages (each writes ``DIR/<name>/`` in vipo_jax's native layout; re-run some with ``--stages``):

* ``text``: ``tokenizer/`` (the toy T5-style tokenizer) and ``text_encoder/``, a UMT5 (one
  relative-attention table per layer, as Wan2.1's UMT5-XXL) with random weights, frozen like a
  pretrained encoder: random token features still identify every word.
* ``vae``: the Wan VAE (causal 3-D convolutions, 4x in time and space) trained to reconstruct
  9-frame 32x32 clips; the per-channel latent mean / std are then measured and stored in its
  config (``latents_mean`` / ``latents_std``, what the Wan pipeline normalises with).
* ``transformer``: the Wan DiT (patch (3, 1, 1): 64 video tokens, see ``sizes.WAN_DIT``),
  rectified flow on the normalised VAE latents (3 x 8 x 8 x 8),
  conditioned on the UMT5 states encoded as WanPipeline does (mask, zero padding). Captions are
  dropped to the negative prompt ("" in the toy world) for ``--caption_dropout`` of the samples, so
  the unconditional branch of classifier-free guidance is a real model of the clip distribution.
  Then the base model is evaluated with the RL runs' deterministic sampler at several guidance
  scales: per-frame digit accuracy (the image world's classifier on frames upsampled to 64x64),
  colour match and redness, written to ``DIR/pretrain_report.json`` with a GIF of samples.

The DINOv2 (PSM), toy CLIP and digit classifier are the image toy world's (``vipo_jax/toy/assets``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from tqdm.auto import tqdm

from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan.velocity import wan_velocity
from vipo_jax.models.wan_vae import WanVAE, WanVAEConfig
from vipo_jax.models.wan_vae.model import decode_to_unit, latents_to_model
from vipo_jax.rewards.pixels import redness_video
from vipo_jax.rl import rollout, sigma_schedule
from vipo_jax.toy import assets, sizes
from vipo_jax.toy.digits import prompt_combos, prompt_set
from vipo_jax.toy.fit import fit, vae_loss
from vipo_jax.toy.rewards import color_match_frames, digit_accuracy_frames
from vipo_jax.toy.tokenizer import make_t5_tokenizer
from vipo_jax.toy.video import sample_clips
from vipo_jax.toy.video_assets import VIDEO_ASSETS, load_video, prompt_encoder
from vipo_jax.utils.compile_cache import enable_compilation_cache
from vipo_jax.utils.media import save_gif, video_grid
from vipo_jax.weights.native import save_native

STAGES = ("text", "vae", "transformer")
#: Sampling settings of the video toy runs (configs/wan.py:toy); the base model is measured with them.
NUM_STEPS, SHIFT = 8, 3.0
EVAL_GUIDANCE = (1.0, 3.0, 5.0)

_OUT = flags.DEFINE_string("out", str(VIDEO_ASSETS), "output folder")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "stages to run")
_SCALE = flags.DEFINE_float("scale", 1.0, "multiply every stage's step count (0.05 for a smoke test)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 3000, "training clips to render")
_VAE_STEPS = flags.DEFINE_integer("vae_steps", 600, "VAE optimizer steps (before --scale)")
_DIT_STEPS = flags.DEFINE_integer("dit_steps", 5000, "DiT optimizer steps (before --scale)")
_DROPOUT = flags.DEFINE_float("caption_dropout", 0.15, "fraction of DiT samples trained on the negative prompt")


@dataclasses.dataclass
class Clips:
    videos: np.ndarray  # uint8 (N, T, 32, 32, 3)
    labels: np.ndarray  # (N, 3)
    caption_idx: np.ndarray  # (N,) index into prompts
    prompts: list[str]

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        i = rng.integers(0, len(self.videos), n)
        return i, self.videos[i].astype(np.float32) / 255.0


def make_clips(n: int, seed: int) -> Clips:
    s = sample_clips(n, seed=seed, split="train")
    prompts = prompt_set(None)
    index = {p: i for i, p in enumerate(prompts)}
    return Clips(videos=(s.videos * 255).round().astype(np.uint8), labels=s.labels,
                 caption_idx=np.array([index[c] for c in s.captions], np.int32), prompts=prompts)


def stage_text(out: Path, seed: int) -> dict:
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    make_t5_tokenizer().save_pretrained(str(tok_dir))
    cfg_path = tok_dir / "tokenizer_config.json"  # loadable by transformers 4 and 5 (see toy/tokenizer.py)
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    cfg = T5Config.from_dict(sizes.WAN_T5)
    model = T5Encoder(cfg, rngs=nnx.Rngs(seed + 11))
    save_native(model, out / "text_encoder", cfg, kind="t5")
    return {"params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))}


def stage_vae(data: Clips, out: Path, steps: int, seed: int) -> dict:
    cfg = WanVAEConfig.from_dict(sizes.WAN_VAE)
    vae = WanVAE(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)

    def batch(i):
        # Random 16x16 crops of 5 consecutive frames (a valid 1 + 4 clip), every 4th step all 9 frames
        # (so the chunk-to-chunk causal context is trained too): the VAE is convolutional, and a full
        # clip's gradient costs about 6 times as much.
        x = data.batch(rng, 16)[1]
        oy, ox = rng.integers(0, x.shape[2] - 15, 2)
        t0 = 0 if i % 4 == 3 else int(rng.integers(0, x.shape[1] - 4))
        t1 = x.shape[1] if i % 4 == 3 else t0 + 5
        return x[:, t0:t1, oy:oy + 16, ox:ox + 16], jax.random.fold_in(key, i)

    losses = fit(vae, vae_loss, batch, steps, 2e-3, "vae")
    enc = jax.jit(lambda x: vae.encode(x * 2 - 1)[0])
    lat = np.concatenate([np.asarray(enc(data.videos[i:i + 64].astype(np.float32) / 255))
                          for i in range(0, min(len(data.videos), 512), 64)])
    mean = lat.reshape(-1, lat.shape[-1]).mean(0)
    std = lat.reshape(-1, lat.shape[-1]).std(0)
    cfg = dataclasses.replace(cfg, latents_mean=tuple(float(v) for v in mean), latents_std=tuple(float(v) for v in std))
    vae.cfg = cfg
    save_native(vae, out / "vae", cfg, kind="wan_vae")
    rec = jax.jit(lambda x: (vae.decode(vae.encode(x * 2 - 1)[0]) + 1) / 2)
    x = data.videos[-64:].astype(np.float32) / 255
    return {"final_loss": float(np.mean(losses[-50:])), "recon_l1": float(np.mean(np.abs(np.asarray(rec(x)) - x))),
            "latent_std_mean": float(std.mean())}


def encode_captions(out: Path, prompts: list[str], negative: str = "") -> tuple[np.ndarray, np.ndarray]:
    """UMT5 states of every prompt (N, L, D) and of the negative prompt (L, D), WanPipeline-style."""
    enc = prompt_encoder(out)
    return enc.encode(prompts)[0], enc.encode([negative])[0][0]


def stage_transformer(data: Clips, out: Path, steps: int, seed: int, dropout: float) -> dict:
    vae = load_video("vae", out)
    text_all, neg = encode_captions(out, data.prompts)
    text_all, neg = jnp.asarray(text_all), jnp.asarray(neg)
    enc = jax.jit(lambda x: latents_to_model(vae.encode(x * 2 - 1)[0], vae.cfg))
    lat = np.concatenate([np.asarray(enc(data.videos[i:i + 64].astype(np.float32) / 255))
                          for i in tqdm(range(0, len(data.videos), 64), desc="encode latents", mininterval=5)])
    cfg = WanConfig.from_dict(sizes.WAN_DIT)
    model = WanTransformer(cfg, rngs=nnx.Rngs(seed + 5))
    rng = np.random.default_rng(seed + 5)
    key = jax.random.PRNGKey(seed + 5)

    def loss_fn(m, x0, cap, k):
        k1, k2, k3 = jax.random.split(k, 3)
        u = jax.nn.sigmoid(jax.random.normal(k1, (x0.shape[0],)))
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # logit-normal, shifted like the sampling schedule
        eps = jax.random.normal(k2, x0.shape)
        s = sigma[:, None, None, None, None]
        xs = (1 - s) * x0 + s * eps
        drop = jax.random.uniform(k3, (x0.shape[0],)) < dropout
        text = jnp.where(drop[:, None, None], neg[None], text_all[cap])
        v = wan_velocity(m, xs, sigma, text)
        return jnp.mean((v - (eps - x0)) ** 2)

    def batch(i):
        idx = rng.integers(0, len(lat), 32)
        return jnp.asarray(lat[idx]), jnp.asarray(data.caption_idx[idx]), jax.random.fold_in(key, i)

    losses = fit(model, loss_fn, batch, steps, 1e-3, "transformer", wd=1e-4, ema_decay=0.998)
    save_native(model, out / "transformer", cfg, kind="wan")
    return {"final_loss": float(np.mean(losses[-100:])), "caption_dropout": dropout,
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model)))), **evaluate_base(out, seed)}


def evaluate_base(out: Path, seed: int, n: int = 64) -> dict:
    """Deterministic ODE samples of the base model (8 steps, shift 3, as the toy runs) at several
    CFG scales: per-frame digit accuracy, colour match, redness; a GIF of samples at guidance 5."""
    model, vae, clf = load_video("transformer", out), load_video("vae", out), assets.load("classifier")
    prompts, combos = prompt_set("train"), prompt_combos("train")
    pick = np.random.default_rng(seed).choice(len(prompts), n, replace=False)
    text, neg = encode_captions(out, [prompts[i] for i in pick])
    labels = jnp.asarray(np.array([combos[i] for i in pick]))
    lat_shape = (n, 3, 8, 8, vae.cfg.z_dim)

    @jax.jit
    def sample(noise, guidance):
        vel = lambda x, s, c: wan_velocity(model, x, s, c[0], c[1], guidance)  # noqa: E731
        negs = jnp.broadcast_to(jnp.asarray(neg), text.shape)
        ro = rollout(vel, noise, (jnp.asarray(text), negs), sigma_schedule(NUM_STEPS, SHIFT), 0.0,
                     jax.random.PRNGKey(0), deterministic=True)
        videos = decode_to_unit(vae, ro["x0"])
        acc = digit_accuracy_frames(clf, videos, labels[:, 0])
        col = color_match_frames(videos, labels[:, 1], labels[:, 2])
        return videos, acc, col, redness_video(videos)

    noise = jax.random.normal(jax.random.PRNGKey(seed + 7), lat_shape)
    report: dict = {"base_num_samples": n, "base_sampler": f"ODE, {NUM_STEPS} steps, shift {SHIFT}"}
    for g in EVAL_GUIDANCE:
        videos, acc, col, red = (np.asarray(a) for a in sample(noise, jnp.float32(g)))
        report[f"cfg{g:g}"] = {"digit_accuracy": float(acc.mean()),
                               "digit_accuracy_per_frame": [round(float(v), 4) for v in acc.mean(0)],
                               "color_match": float(col.mean()), "redness": float(red.mean())}
        if g == 5.0:
            save_gif(out / "transformer" / "base_samples.gif", video_grid(videos[:32], cols=8), fps=6, scale=2)
    return report


def main(argv: list[str]) -> None:
    del argv
    enable_compilation_cache()
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(_STAGES.value) - set(STAGES))
    if unknown:
        raise app.UsageError(f"unknown stages {unknown}; choose from {STAGES}")
    report_path = out / "pretrain_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    t_all = time.perf_counter()
    data = None
    if set(_STAGES.value) & {"vae", "transformer"}:
        t = time.perf_counter()
        data = make_clips(_NUM_CLIPS.value, _SEED.value)
        report["render_seconds"] = round(time.perf_counter() - t, 1)
        print(f"rendered {len(data.videos)} training clips in {report['render_seconds']:.0f}s")
    s, seed = _SCALE.value, _SEED.value
    for stage in STAGES:
        if stage not in _STAGES.value:
            continue
        t = time.perf_counter()
        if stage == "text":
            r = stage_text(out, seed)
        elif stage == "vae":
            r = stage_vae(data, out, max(2, int(_VAE_STEPS.value * s)), seed)
        else:
            r = stage_transformer(data, out, max(2, int(_DIT_STEPS.value * s)), seed, _DROPOUT.value)
        r["seconds"] = round(time.perf_counter() - t, 1)
        report[stage] = r
        print(f"[{stage}] {r}")
        report_path.write_text(json.dumps(report, indent=1))
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report_path.write_text(json.dumps(report, indent=1))
    print(f"done in {report['total_seconds']:.0f}s; report in {report_path}")


if __name__ == "__main__":
    app.run(main)
