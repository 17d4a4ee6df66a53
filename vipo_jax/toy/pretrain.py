"""Pretrain the toy world's models on 2 CPU cores: ``python -m vipo_jax.toy.pretrain --out=DIR``.

Stages (each writes ``DIR/<name>/`` in vipo_jax's native layout and can be re-run alone with
``--stages``): tokenizers, t5 (random, frozen like a pretrained encoder), vae (reconstruction),
clip (contrastive on image/caption pairs: the toy CLIP reward and Flux's pooled text encoder),
dinov2 (the PSM backbone: trained to tell the digit's patches from the background and to read
digit and colours from the CLS token), classifier (reads the digit), classifier_eval (a second
classifier, trained independently: other seed, other batches, wider layers; it evaluates runs that
train on the first one's log-probability, ``digit_logprob``), transformer (the Flux DiT,
rectified flow on VAE latents conditioned on T5 + CLIP text). The committed default assets were
made with the default arguments; the whole run took 19 minutes on 2 idle CPU cores
(``assets/pretrain_report.json``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from tqdm.auto import tqdm

from vipo_jax.models.clip import CLIPModel
from vipo_jax.models.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from vipo_jax.models.clip.model import l2_normalize
from vipo_jax.models.dinov2 import Dinov2Config, Dinov2Model
from vipo_jax.models.dinov2.model import preprocess as dino_preprocess
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.flux.velocity import flux_velocity
from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from vipo_jax.models.vae.model import decode_to_unit, latents_to_model
from vipo_jax.rewards.clip_scores import preprocess as clip_preprocess
from vipo_jax.rewards.pixels import redness
from vipo_jax.rl import rollout, sigma_schedule
from vipo_jax.text.tokenizers import load_tokenizer, tokenize
from vipo_jax.toy import assets, sizes
from vipo_jax.toy.classifier import DigitClassifier, DigitClassifierConfig
from vipo_jax.toy.digits import PALETTE_RGB, prompt_combos, prompt_set, sample_dataset
from vipo_jax.toy.fit import fit, vae_loss
from vipo_jax.toy.rewards import color_match
from vipo_jax.toy.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, T5_MAX_LENGTH, build_toy_tokenizers, clip_vocab
from vipo_jax.utils.compile_cache import enable_compilation_cache
from vipo_jax.utils.media import image_grid, save_png
from vipo_jax.weights.native import save_native

ASSETS = Path(__file__).resolve().parent / "assets"
STAGES = ("tokenizers", "t5", "vae", "clip", "dinov2", "classifier", "classifier_eval", "transformer")

_OUT = flags.DEFINE_string("out", str(ASSETS), "output folder")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "stages to run")
_SCALE = flags.DEFINE_float("scale", 1.0, "multiply every stage's step count (0.05 for a smoke test)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8000, "training images to render")


@dataclasses.dataclass
class Data:
    images: np.ndarray  # uint8 (N, 64, 64, 3)
    labels: np.ndarray  # (N, 3) digit, fg, bg
    caption_idx: np.ndarray  # (N,) index into prompts
    prompts: list[str]
    alpha: np.ndarray  # (N, 64, 64) foreground coverage in [0, 1]

    def batch(self, rng: np.random.Generator, n: int):
        i = rng.integers(0, len(self.images), n)
        return i, self.images[i].astype(np.float32) / 255.0


def make_data(n: int, seed: int) -> Data:
    d = sample_dataset(n, seed=seed, split="train")
    prompts = prompt_set(None)
    index = {p: i for i, p in enumerate(prompts)}
    fg = PALETTE_RGB[d.labels[:, 1]][:, None, None, :]
    bg = PALETTE_RGB[d.labels[:, 2]][:, None, None, :]
    diff = fg - bg
    alpha = ((d.images - bg) * diff).sum(-1) / np.maximum((diff * diff).sum(-1), 1e-6)
    return Data(images=(d.images * 255).round().astype(np.uint8), labels=d.labels.astype(np.int32),
                caption_idx=np.array([index[c] for c in d.captions], np.int32), prompts=prompts,
                alpha=np.clip(alpha, 0, 1).astype(np.float32))


def stage_vae(data: Data, out: Path, scale: float, seed: int) -> dict:
    cfg = AutoencoderKLConfig.from_dict(sizes.VAE)
    vae = AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)

    def batch(i):
        # Random 32x32 crops: the VAE is convolutional (its mid-block attention is global but
        # size-agnostic), and a crop costs a quarter of a full image on 2 CPU cores.
        x = data.batch(rng, 32)[1]
        oy, ox = rng.integers(0, 33, 2)
        return x[:, oy:oy + 32, ox:ox + 32], jax.random.fold_in(key, i)

    losses = fit(vae, vae_loss, batch, int(500 * scale), 2e-3, "vae")
    enc = jax.jit(lambda x: vae.encode(x * 2 - 1)[0])
    lat = np.concatenate([np.asarray(enc(data.images[i:i + 256].astype(np.float32) / 255))
                          for i in range(0, min(len(data.images), 2048), 256)])
    shift, std = float(lat.mean()), float(lat.std())
    cfg = dataclasses.replace(cfg, shift_factor=shift, scaling_factor=1.0 / std)
    save_native(vae, out / "vae", cfg, kind="vae")
    return {"final_loss": float(np.mean(losses[-50:])), "shift_factor": shift, "scaling_factor": 1 / std}


def stage_tokenizers(out: Path) -> dict:
    build_toy_tokenizers(out)
    return {}


def _tokenized(out: Path, prompts: list[str]):
    clip_ids, clip_mask = tokenize(load_tokenizer(out / "tokenizer"), prompts, CLIP_MAX_LENGTH)
    t5_ids, t5_mask = tokenize(load_tokenizer(out / "tokenizer_2"), prompts, T5_MAX_LENGTH)
    return clip_ids, clip_mask, t5_ids, t5_mask


def stage_t5(out: Path, seed: int) -> dict:
    """A T5 encoder with random weights: frozen, like FLUX's pretrained T5, whose features the DiT
    learns to read; random token features still identify every word."""
    cfg = T5Config.from_dict(sizes.T5)
    model = T5Encoder(cfg, rngs=nnx.Rngs(seed + 1))
    save_native(model, out / "text_encoder_2", cfg, kind="t5")
    return {"params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))}


def toy_clip_config():
    v = clip_vocab()
    text = CLIPTextConfig(**sizes.CLIP_TEXT, projection_dim=sizes.CLIP_PROJECTION, pad_token_id=v[CLIP_EOS],
                          bos_token_id=v[CLIP_BOS], eos_token_id=v[CLIP_EOS])
    vision = CLIPVisionConfig(**sizes.CLIP_VISION, projection_dim=sizes.CLIP_PROJECTION)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.CLIP_PROJECTION)


def stage_clip(data: Data, out: Path, scale: float, seed: int) -> dict:
    """Contrastive image/caption training: the toy CLIP-score reward and Flux's pooled text encoder."""
    cfg = toy_clip_config()
    model = CLIPModel(cfg, rngs=nnx.Rngs(seed + 2))
    clip_ids, clip_mask, _, _ = _tokenized(out, data.prompts)
    rng = np.random.default_rng(seed + 2)

    def loss_fn(m, x, ids, cap):
        img = l2_normalize(m.get_image_features(clip_preprocess(x, sizes.IMAGE_SIZE)))
        txt = l2_normalize(m.get_text_features(ids))
        logits = jnp.exp(m.logit_scale[...]) * img @ txt.T
        same = (cap[:, None] == cap[None, :]).astype(jnp.float32)
        target = same / same.sum(-1, keepdims=True)
        return 0.5 * (optax.softmax_cross_entropy(logits, target).mean()
                      + optax.softmax_cross_entropy(logits.T, target).mean())

    def batch(i):
        idx, x = data.batch(rng, 64)
        cap = data.caption_idx[idx]
        return x, jnp.asarray(clip_ids[cap]), jnp.asarray(cap)

    losses = fit(model, loss_fn, batch, int(480 * scale), 2e-3, "clip", wd=1e-4)
    save_native(model, out / "clip", cfg, kind="clip")
    # retrieval accuracy of the caption among all prompts, on fresh eval-split images
    ev = sample_dataset(256, seed=seed + 100, split="eval", prompt_split=None)
    txt = l2_normalize(jax.jit(lambda i: model.get_text_features(i))(jnp.asarray(clip_ids)))
    img = l2_normalize(jax.jit(lambda x: model.get_image_features(clip_preprocess(x, sizes.IMAGE_SIZE)))(ev.images))
    pred = np.asarray(jnp.argmax(img @ txt.T, -1))
    truth = np.array([data.prompts.index(c) for c in ev.captions])
    return {"final_loss": float(np.mean(losses[-50:])), "eval_retrieval_top1": float(np.mean(pred == truth))}


class DinoPretrainer(nnx.Module):
    """DINOv2 backbone + two throw-away heads: CLS -> (digit, fg, bg), patch -> stroke coverage."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.backbone = Dinov2Model(cfg, rngs=rngs)
        d = cfg.hidden_size
        self.cls_head = nnx.Linear(d, 10 + 9 + 9, rngs=rngs)
        self.patch_head = nnx.Linear(d, 1, rngs=rngs)


def stage_dinov2(data: Data, out: Path, scale: float, seed: int) -> dict:
    cfg = Dinov2Config.from_dict(sizes.DINO)
    m = DinoPretrainer(cfg, nnx.Rngs(seed + 3))
    rng = np.random.default_rng(seed + 3)
    p = cfg.patch_size
    g = sizes.IMAGE_SIZE // p

    def loss_fn(m, x, labels, cover):
        h = m.backbone(dino_preprocess(x, sizes.IMAGE_SIZE, patch_size=p))
        logits = m.cls_head(h[:, 0])
        ce = sum(optax.softmax_cross_entropy_with_integer_labels(logits[:, a:b], labels[:, j]).mean()
                 for j, (a, b) in enumerate(((0, 10), (10, 19), (19, 28))))
        patch = m.patch_head(h[:, 1:])[..., 0]
        return ce + 4.0 * jnp.mean((jax.nn.sigmoid(patch) - cover) ** 2)

    def batch(i):
        idx, x = data.batch(rng, 48)
        cover = data.alpha[idx].reshape(len(idx), g, p, g, p).mean(axis=(2, 4)).reshape(len(idx), g * g)
        return x, jnp.asarray(data.labels[idx]), jnp.asarray(cover)

    losses = fit(m, loss_fn, batch, int(400 * scale), 1e-3, "dinov2", wd=1e-4)
    save_native(m.backbone, out / "dinov2", cfg, kind="dinov2")
    return {"final_loss": float(np.mean(losses[-50:]))}


def stage_classifier(data: Data, out: Path, scale: float, seed: int, *, name: str = "classifier",
                     cfg: DigitClassifierConfig | None = None, offset: int = 4) -> dict:
    cfg = cfg or DigitClassifierConfig()
    model = DigitClassifier(cfg, rngs=nnx.Rngs(seed + offset))
    rng = np.random.default_rng(seed + offset)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    def batch(i):
        idx, x = data.batch(rng, 64)
        return x, jnp.asarray(data.labels[idx, 0])

    losses = fit(model, loss_fn, batch, int(600 * scale), 2e-3, name, wd=1e-4)
    save_native(model, out / name, cfg, kind="digit_classifier")
    ev = sample_dataset(512, seed=seed + 200, split="eval", prompt_split=None)
    acc = float(np.mean(np.asarray(jnp.argmax(jax.jit(model)(ev.images), -1)) == ev.labels[:, 0]))
    return {"final_loss": float(np.mean(losses[-50:])), "eval_accuracy": acc}


def stage_transformer(data: Data, out: Path, scale: float, seed: int) -> dict:
    """Rectified-flow training of the Flux DiT on VAE latents, conditioned like FLUX.1-dev."""
    vae = assets.load("vae", out)
    cond = assets.encode_prompts(data.prompts, out)
    t5_all, pooled_all = jnp.asarray(cond["t5"]), jnp.asarray(cond["pooled"])
    enc = jax.jit(lambda x: latents_to_model(vae.encode(x * 2 - 1)[0], vae.cfg))
    lat = np.concatenate([np.asarray(enc(data.images[i:i + 256].astype(np.float32) / 255))
                          for i in tqdm(range(0, len(data.images), 256), desc="encode latents")])
    cfg = FluxConfig.from_dict(sizes.DIT)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(seed + 5))
    rng = np.random.default_rng(seed + 5)
    key = jax.random.PRNGKey(seed + 5)

    def loss_fn(m, x0, cap, k):
        k1, k2, k3 = jax.random.split(k, 3)
        u = jax.nn.sigmoid(jax.random.normal(k1, (x0.shape[0],)))
        sigma = 3.0 * u / (1 + 2.0 * u)  # logit-normal, shifted like the sampling schedule (shift 3)
        eps = jax.random.normal(k2, x0.shape)
        xs = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        guidance = jax.random.uniform(k3, (x0.shape[0],), minval=1.0, maxval=5.0)
        v = flux_velocity(m, xs, sigma, t5_all[cap], pooled_all[cap], guidance)
        return jnp.mean((v - (eps - x0)) ** 2)

    def batch(i):
        # Batch 16: on 2 CPU cores the cheapest per sample (9 ms vs 11 ms at 32), and twice the updates.
        idx = rng.integers(0, len(lat), 16)
        return jnp.asarray(lat[idx]), jnp.asarray(data.caption_idx[idx]), jax.random.fold_in(key, i)

    losses = fit(model, loss_fn, batch, int(3400 * scale), 1e-3, "transformer", wd=1e-4, ema_decay=0.999)
    save_native(model, out / "transformer", cfg, kind="flux")
    return {"final_loss": float(np.mean(losses[-100:])), **evaluate_base(out, seed)}


def evaluate_base(out: Path, seed: int, n: int = 96) -> dict:
    """ODE samples of the base model (8 steps, shift 3, as the RL runs): is the digit readable,
    do the colours follow the prompt? Also writes ``base_samples.png`` into the transformer folder."""
    model, vae, clf = assets.load("transformer", out), assets.load("vae", out), assets.load("classifier", out)
    prompts, combos = prompt_set("train"), prompt_combos("train")
    pick = np.random.default_rng(seed).choice(len(prompts), n, replace=False)
    cond = assets.encode_prompts([prompts[i] for i in pick], out)
    labels = np.array([combos[i] for i in pick])

    @jax.jit
    def sample(t5, pooled, noise):
        vel = lambda x, s, c: flux_velocity(model, x, s, c[0], c[1], jnp.full((x.shape[0],), 3.5))  # noqa: E731
        ro = rollout(vel, noise, (t5, pooled), sigma_schedule(8, 3.0), 0.0, jax.random.PRNGKey(0),
                     deterministic=True)
        return decode_to_unit(vae, ro["x0"])

    noise = jax.random.normal(jax.random.PRNGKey(seed + 7), (n, 16, 16, sizes.VAE["latent_channels"]))
    imgs = np.asarray(sample(jnp.asarray(cond["t5"]), jnp.asarray(cond["pooled"]), noise))
    digit_acc = float(np.mean(np.asarray(jnp.argmax(clf(jnp.asarray(imgs)), -1)) == labels[:, 0]))
    colors = float(np.mean(np.asarray(color_match(jnp.asarray(imgs), labels[:, 1], labels[:, 2]))))
    save_png(out / "transformer" / "base_samples.png", image_grid(imgs[:48], cols=12), scale=1)
    return {"base_digit_accuracy": digit_acc, "base_color_match": colors,
            "base_redness": float(np.mean(np.asarray(redness(jnp.asarray(imgs)))))}


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
    need_data = set(_STAGES.value) & {"vae", "clip", "dinov2", "classifier", "classifier_eval", "transformer"}
    data = None
    if need_data:
        t = time.perf_counter()
        data = make_data(_NUM_IMAGES.value, _SEED.value)
        print(f"rendered {len(data.images)} training images in {time.perf_counter() - t:.0f}s")
    s, seed = _SCALE.value, _SEED.value
    for stage in STAGES:
        if stage not in _STAGES.value:
            continue
        t = time.perf_counter()
        if stage == "tokenizers":
            r = stage_tokenizers(out)
        elif stage == "t5":
            r = stage_t5(out, seed)
        elif stage == "vae":
            r = stage_vae(data, out, s, seed)
        elif stage == "clip":
            r = stage_clip(data, out, s, seed)
        elif stage == "dinov2":
            r = stage_dinov2(data, out, s, seed)
        elif stage == "classifier":
            r = stage_classifier(data, out, s, seed)
        elif stage == "classifier_eval":
            r = stage_classifier(data, out, s, seed, name="classifier_eval", offset=44,
                                 cfg=DigitClassifierConfig(channels=(24, 32, 32), hidden=48))
        else:
            r = stage_transformer(data, out, s, seed)
        r["seconds"] = round(time.perf_counter() - t, 1)
        report[stage] = r
        print(f"[{stage}] {r}")
        report_path.write_text(json.dumps(report, indent=1))
    print(f"done in {time.perf_counter() - t_all:.0f}s; report in {report_path}")


if __name__ == "__main__":
    app.run(main)
