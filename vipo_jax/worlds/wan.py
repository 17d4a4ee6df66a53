"""Wan2.1 world: the Wan DiT as the policy (true classifier-free guidance with a negative prompt),
the Wan VAE as decoder, DINOv2 per frame as the PSM backbone, and per-frame rewards, wired into the
pure callables the train step composes. Latents are (T, H, W, C) per sample, so the step runs the
video PSM (per-frame maps -> latent frames -> temporal smoothing -> one min-max over the volume).

``world="toy"`` loads the committed video toy checkpoints (``vipo_jax/toy/assets/video``: moving
digits, 9 frames of 32x32) with the image toy world's DINOv2, CLIP and classifier applied per frame;
``world="real"`` loads a diffusers Wan2.1 T2V folder (``--config.model.path``), a DINOv2 folder
(``--config.psm.backbone``) and reward checkpoints, and encodes the prompt file, the evaluation
prompts and the negative prompt once into embedding caches next to the prompt file (UMT5-XXL is
not in memory during training).

Conditioning per prompt is ``{"text": (L, D), "neg": (L, D)}``: the prompt's and the negative
prompt's UMT5 states, zero-padded to L as WanPipeline does. The negative row is shared: a table
holds it once (``table["neg"]`` with one row) and :meth:`WanWorld.batch_from` repeats it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.training.step import StepConfig
from vipo_jax.training.validate import reward_spec
from vipo_jax.worlds.flux import EVAL_SEED, _Loader, step_config
from vipo_jax.worlds.wan_policy import wan_velocity

#: Wan's default negative prompt (Wan2.1 ``sample_neg_prompt``), the one the ViPO Wan script trains
#: with. diffusers' WanPipeline uses "" when none is given and shows an English rendering of this one
#: in its example.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
COND_KEYS = ("text", "neg")
VARIANTS = {"1.3b": "Wan2.1-T2V-1.3B", "14b": "Wan2.1-T2V-14B"}


@dataclasses.dataclass
class WanWorld:
    config: mlc.ConfigDict
    policy: nnx.Module
    graphdefs: dict
    frozen: dict
    prompts: list[str]
    cond: dict  # per prompt: text (N, L, D), neg (1, L, D), and reward / metric inputs
    eval_prompts: list[str]
    eval_cond: dict
    latent_shape: tuple[int, int, int, int]  # (T, H, W, C)
    step_config: StepConfig
    reward_fns: dict
    eval_fns: dict
    main_reward: str
    png_scale: int = 1
    guidance: float | None = None  # true CFG scale; None: conditional only
    uncond_grad: bool = False
    dino_size: tuple[int, int] | None = None  # frames resized to this for DINOv2 (None: as decoded)
    frames_per_call: int = 0  # DINOv2 frames per sample per call (0: all at once)
    fps: float = 8.0  # of the evaluation GIFs
    encode: Callable[[list[str]], dict] | None = None
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    # --- the pure callables of the train step ----------------------------------------------------
    def velocity_fn(self, params, x, sigma, cond):
        model = nnx.merge(self.graphdefs["policy"], params)
        return wan_velocity(model, x, sigma, cond["text"], cond["neg"], self.guidance, uncond_grad=self.uncond_grad)

    def decode_fn(self, frozen, x0):
        from vipo_jax.models.wan_vae.model import decode_to_unit

        return decode_to_unit(nnx.merge(self.graphdefs["vae"], frozen["vae"]), x0)

    def feature_fn(self, frozen, videos):
        """Per-frame DINOv2 patch tokens (B, T, h, w, D) of decoded videos (B, T, H, W, 3)."""
        from vipo_jax.models.dinov2.model import patch_tokens, preprocess
        from vipo_jax.rewards.video import map_frames

        dino = nnx.merge(self.graphdefs["dinov2"], frozen["dinov2"])
        size = self.dino_size or tuple(videos.shape[2:4])
        return map_frames(lambda fr: patch_tokens(dino, preprocess(fr, size, patch_size=dino.config.patch_size))[0],
                          videos, self.frames_per_call)

    # --- data ----------------------------------------------------------------------------------
    def prompt_loader(self, c: mlc.ConfigDict) -> _Loader:
        return _Loader(len(self.prompts), c.sampling.prompts_per_iter, c.seed)

    def batch(self, indices: np.ndarray) -> dict:
        return self.batch_from(self.cond, indices)

    @staticmethod
    def batch_from(table: dict, indices: np.ndarray) -> dict:
        """Rows ``indices`` of a per-prompt table as the step's batch: ``{"cond": {"text", "neg"},
        **metric inputs}`` (the table's single negative row repeated per prompt)."""
        indices = np.asarray(indices)
        take = {k: jnp.asarray(np.asarray(v)[indices]) for k, v in table.items() if k != "neg"}
        neg = np.asarray(table["neg"])
        neg = jnp.asarray(np.broadcast_to(neg[:1], (len(indices),) + neg.shape[1:]))
        return {"cond": {"text": take.pop("text"), "neg": neg}, **take}

    def eval_inputs(self, c: mlc.ConfigDict):
        n = len(self.eval_prompts)
        noise = jax.random.normal(jax.random.PRNGKey(EVAL_SEED), (n,) + tuple(self.latent_shape))
        return self.batch_from(self.eval_cond, np.arange(n))["cond"], noise, self.eval_prompts

    def eval_metrics(self, videos: np.ndarray, prompts: list[str]) -> dict:
        """Mean of every eval metric over host ``videos`` (n, T, H, W, 3) of the evaluation prompts."""
        from vipo_jax.worlds.metrics import eval_means

        batch = {k: v for k, v in self.eval_cond.items() if k not in COND_KEYS}
        return eval_means(self._jitted, self.eval_fns, self.frozen, videos, batch)


def guidance_scale(c: mlc.ConfigDict) -> float | None:
    """The true-CFG scale, or None (no unconditional pass) for a scale <= 1, as diffusers does."""
    g = float(c.sampling.guidance)
    return g if g > 1.0 else None


def latent_shape_for(c: mlc.ConfigDict, vae_cfg: Any) -> tuple[int, int, int, int]:
    s, f = c.sampling, vae_cfg.spatial_factor
    return (vae_cfg.latent_frames(s.num_frames), s.height // f, s.width // f, vae_cfg.z_dim)


# --- rewards ------------------------------------------------------------------------------------------
def _toy_rewards(g: dict, names: list[str]) -> tuple[dict, dict]:
    """Per-frame toy rewards (redness, toy CLIP score) and metrics (+ digit accuracy, colour match),
    frames read at 64x64 like the image toy world's images."""
    from vipo_jax.rewards.video import color_match_frames, digit_accuracy_frames, redness_video, toy_clip_video
    from vipo_jax.toy.video import READOUT_SIZE

    def red(frozen, videos, batch):
        return redness_video(videos)

    def toy_clip(frozen, videos, batch):
        return toy_clip_video(nnx.merge(g["clip"], frozen["clip"]), videos, batch["clip_ids"], size=READOUT_SIZE)

    def digit_accuracy(frozen, videos, batch):
        clf = nnx.merge(g["classifier"], frozen["classifier"])
        return jnp.mean(digit_accuracy_frames(clf, videos, batch["labels"][:, 0], size=READOUT_SIZE), axis=1)

    def colors(frozen, videos, batch):
        return jnp.mean(color_match_frames(videos, batch["labels"][:, 1], batch["labels"][:, 2], size=READOUT_SIZE),
                        axis=1)

    known = {"redness": red, "toy_clip": toy_clip}
    for n in names:
        if n not in known:
            raise ConfigError(f"reward {n!r} is not available in the video toy world (use redness or toy_clip)")
    train = {n: known[n] for n in names}
    train.update({n: f for n, f in known.items() if n not in train})  # monitor every toy reward
    train["digit_accuracy"] = digit_accuracy
    return train, {**known, "digit_accuracy": digit_accuracy, "color_match": colors}


def check_reward_names(c: mlc.ConfigDict) -> None:
    """Fail before any model loads for a reward the real Wan world cannot score (VideoAlign: not
    ported; its registry entry raises the ConfigError that says what the interface is)."""
    from vipo_jax.rewards.video import PER_FRAME_REWARDS, VIDEO_REWARD_MODELS

    for name, _ in reward_spec(c):
        if name in VIDEO_REWARD_MODELS:
            VIDEO_REWARD_MODELS[name](c)
        elif name not in PER_FRAME_REWARDS:
            raise ConfigError(f"reward {name!r} is not available in the Wan world, which scores "
                              f"{', '.join(PER_FRAME_REWARDS)} per frame (or a video reward model)")


def _real_rewards(c: mlc.ConfigDict, sharding: Any = None) -> tuple[dict, dict, dict, Callable[[list[str]], dict]]:
    """CLIP-family reward models scored per frame: (fns, graphdefs, frozen params, prompts -> inputs)."""
    from vipo_jax.models.clip import load_clip
    from vipo_jax.rewards.video import clip_family_video
    from vipo_jax.text.tokenizers import load_tokenizer, tokenize

    check_reward_names(c)
    tok_dir = c.rewards.get("clip_tokenizer", "")
    if not tok_dir or not Path(tok_dir).is_dir():
        raise CheckpointError(
            f"--config.rewards.clip_tokenizer={tok_dir!r}: the Wan folder has no CLIP tokenizer; give a CLIP "
            "tokenizer folder (e.g. the tokenizer files of openai/clip-vit-large-patch14 or of a FLUX.1 folder's "
            "tokenizer/) to tokenize prompts for the CLIP-family rewards")
    tok = load_tokenizer(tok_dir)
    kinds = {"hpsv21": "hps_v21", "pickscore": "pickscore", "clip_score": "clip_score"}
    graphdefs, frozen, fns = {}, {}, {}
    stride, per_call = int(c.rewards.get("frame_stride", 1)), int(c.rewards.get("frames_per_call", 0))
    for name, _ in reward_spec(c):
        path = c.rewards[name]
        if not path or not Path(path).exists():
            raise CheckpointError(f"reward model for {name} not found: --config.rewards.{name}={path!r}")
        model = load_clip(path, param_dtype="bfloat16" if c.model.dtype == "bfloat16" else "float32",
                          sharding=sharding)
        graphdefs[name], frozen[f"reward_{name}"] = nnx.split(model)

        def fn(frozen_, videos, batch, name=name, kind=kinds[name]):
            model_ = nnx.merge(graphdefs[name], frozen_[f"reward_{name}"])
            return clip_family_video(model_, videos, batch["reward_ids"], kind, frame_stride=stride,
                                     frames_per_call=per_call)

        fns[name] = fn

    def inputs(texts: list[str]) -> dict:
        return {"reward_ids": tokenize(tok, texts, 77)[0]}

    return fns, graphdefs, frozen, inputs


# --- the toy world --------------------------------------------------------------------------------------
def build_toy_world(c: mlc.ConfigDict) -> WanWorld:
    from vipo_jax.text.tokenizers import load_tokenizer, tokenize
    from vipo_jax.toy import assets
    from vipo_jax.toy.digits import caption, parse_caption, prompt_combos, prompt_set
    from vipo_jax.toy.tokenizer import CLIP_MAX_LENGTH
    from vipo_jax.toy.video import FRAME_SIZE, FRAMES, READOUT_SIZE
    from vipo_jax.toy.video_assets import load_video, prompt_encoder, video_assets_dir

    s = c.sampling
    if (s.height, s.width, s.num_frames) != (FRAME_SIZE, FRAME_SIZE, FRAMES):
        raise ConfigError(f"the video toy world generates {FRAMES} frames of {FRAME_SIZE}x{FRAME_SIZE}: keep "
                          f"--config.sampling.height/width at {FRAME_SIZE} and num_frames at {FRAMES}")
    root, image_root = video_assets_dir(c.model.path or None), assets.assets_dir()
    policy = load_video("transformer", root, param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                        remat=c.model.remat, attention=c.model.attention)
    frozen_models = {"vae": load_video("vae", root), "dinov2": assets.load("dinov2", image_root),
                     "clip": assets.load("clip", image_root), "classifier": assets.load("classifier", image_root)}
    graphdefs, frozen = {"policy": nnx.graphdef(policy)}, {}
    for k, m in frozen_models.items():
        graphdefs[k], frozen[k] = nnx.split(m)
    encoder = prompt_encoder(root)
    clip_tok = load_tokenizer(image_root / "tokenizer")
    neg = encoder.encode([s.negative_prompt])[0]

    def encode(texts: list[str]) -> dict:
        labels = np.asarray([parse_caption(t) for t in texts], np.int32)
        return {"text": encoder.encode(texts)[0], "neg": neg, "labels": labels,
                "clip_ids": tokenize(clip_tok, texts, CLIP_MAX_LENGTH)[0]}

    train_prompts = prompt_set("train")
    # fixed evaluation prompts: half in-domain, half held-out combinations (as the image toy world)
    n_out = c.log.num_eval_prompts // 2
    n_in = c.log.num_eval_prompts - n_out
    train_combos, held_out = prompt_combos("train"), prompt_combos("eval")
    ev = (train_combos[:: max(1, len(train_combos) // max(1, n_in))][:n_in]
          + held_out[:: max(1, len(held_out) // max(1, n_out))][:n_out])
    eval_prompts = [caption(*t) for t in ev]
    names = [n for n, _ in reward_spec(c)]
    reward_fns, eval_fns = _toy_rewards(graphdefs, names)
    return WanWorld(config=c, policy=policy, graphdefs=graphdefs, frozen=frozen, prompts=train_prompts,
                    cond=encode(train_prompts), eval_prompts=eval_prompts, eval_cond=encode(eval_prompts),
                    latent_shape=latent_shape_for(c, frozen_models["vae"].cfg), step_config=step_config(c),
                    reward_fns=reward_fns, eval_fns=eval_fns, main_reward=names[0], png_scale=3,
                    guidance=guidance_scale(c), uncond_grad=bool(s.cfg_uncond_grad),
                    dino_size=(READOUT_SIZE, READOUT_SIZE), frames_per_call=int(c.psm.frames_per_call),
                    fps=float(s.fps), encode=encode)


# --- the real world -------------------------------------------------------------------------------------
REAL_HELP = """\
Wan2.1 weights not found{where}.
Download the diffusers folder of Wan-AI/{name}-Diffusers (it has transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), e.g.
    huggingface-cli download Wan-AI/{name}-Diffusers --local-dir /data/{name}-Diffusers
then pass --config.model.path=/data/{name}-Diffusers. Also needed: --config.psm.backbone=<facebook/dinov2-large
folder>, the reward checkpoints (--config.rewards.hpsv21=<converted HPS_v2.1 safetensors>, see
`python -m vipo_jax.convert hps --help`) with --config.rewards.clip_tokenizer=<CLIP tokenizer folder>,
and --config.data.prompts=<prompts.txt>."""


def check_real_paths(c: mlc.ConfigDict) -> Path:
    """The Wan folder, after checking every path the real world needs, with what to download."""
    name = VARIANTS.get(str(c.model.variant), str(c.model.variant))
    root = Path(c.model.path) if c.model.path else None
    if root is None or not root.is_dir():
        where = f" at {root}" if root else " (--config.model.path is empty)"
        raise CheckpointError(REAL_HELP.format(where=where, name=name))
    missing = [d for d in ("transformer", "vae", "text_encoder", "tokenizer") if not (root / d).is_dir()]
    if missing:
        raise CheckpointError(REAL_HELP.format(where=f" completely in {root}: missing {', '.join(missing)}",
                                               name=name))
    if c.psm.enabled and not (c.psm.backbone and Path(c.psm.backbone).is_dir()):
        raise CheckpointError(f"DINOv2 backbone folder not found: --config.psm.backbone={c.psm.backbone!r}. "
                              "Download facebook/dinov2-large (or disable the PSM with --config.psm.enabled=False).")
    if not c.data.prompts:
        raise DataError("--config.data.prompts is empty: give a prompts file (one prompt per line, or JSONL)")
    return root


def cached_embeddings(sets: dict[str, list[str]], paths: dict[str, Path],
                      new_encoder: Callable[[], Any]) -> dict[str, Any]:
    """Prompt embeddings of several prompt sets (training, evaluation, the negative prompt), each
    from its cache file when that was built for exactly these prompts, else encoded and cached.
    The encoder (UMT5-XXL: 11 GB in bf16) is loaded at most once, and only if a cache is stale."""
    from vipo_jax.text.prompt_cache import build_cache, load_cache

    out, stale = {}, []
    for k, prompts in sets.items():
        try:
            out[k] = load_cache(paths[k], prompts)
        except DataError:
            stale.append(k)
    if stale:
        encoder = new_encoder()
        for k in stale:
            out[k] = build_cache(sets[k], encoder, paths[k], overwrite=True)
        del encoder
    return out


def build_real_world(c: mlc.ConfigDict, sharding: Any = None) -> WanWorld:
    from vipo_jax.data.prompts import load_prompts
    from vipo_jax.models.dinov2 import load_dinov2
    from vipo_jax.models.wan import load_wan_transformer
    from vipo_jax.models.wan_vae import load_wan_vae
    from vipo_jax.text.prompt_cache import PromptEncoder, cache_path_for

    check_reward_names(c)
    root = check_real_paths(c)
    s = c.sampling
    prompts = load_prompts(c.data.prompts, c.data.cache_dir or None).prompts()
    eval_prompts = (load_prompts(c.data.eval_prompts, c.data.cache_dir or None).prompts()
                    if c.data.eval_prompts else prompts[: c.log.num_eval_prompts])[: c.log.num_eval_prompts]
    tag = f"wan-{c.model.variant}-{s.max_text_len}-{c.model.dtype}"

    def new_encoder() -> PromptEncoder:
        return PromptEncoder.from_wan(root, dtype=c.model.dtype, param_dtype=c.model.dtype,
                                      max_sequence_length=s.max_text_len)

    sets = {"train": prompts, "eval": eval_prompts, "neg": [s.negative_prompt]}
    paths = {"train": cache_path_for(c.data.prompts, tag), "eval": cache_path_for(c.data.prompts, tag + "-eval"),
             "neg": cache_path_for(c.data.prompts, tag + "-negative")}
    emb = cached_embeddings(sets, paths, new_encoder)
    policy = load_wan_transformer(root / "transformer", param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                                  remat=c.model.remat, attention=c.model.attention, sharding=sharding)
    vae = load_wan_vae(root / "vae", dtype=c.model.dtype, sharding=sharding)
    graphdefs, frozen = {"policy": nnx.graphdef(policy)}, {}
    graphdefs["vae"], frozen["vae"] = nnx.split(vae)
    if c.psm.enabled:
        graphdefs["dinov2"], frozen["dinov2"] = nnx.split(load_dinov2(c.psm.backbone, dtype=c.model.dtype,
                                                                      sharding=sharding))
    reward_fns, rg, rf, reward_inputs = _real_rewards(c, sharding)
    graphdefs.update(rg)
    frozen.update(rf)
    neg = emb["neg"].t5
    names = [n for n, _ in reward_spec(c)]

    def encode(texts: list[str]) -> dict:
        """Encodes with a freshly loaded UMT5 (evaluation only: training reads the caches)."""
        return {"text": new_encoder().encode(texts)[0], "neg": neg, **reward_inputs(texts)}

    return WanWorld(config=c, policy=policy, graphdefs=graphdefs, frozen=frozen, prompts=prompts,
                    cond={"text": emb["train"].t5, "neg": neg, **reward_inputs(prompts)}, eval_prompts=eval_prompts,
                    eval_cond={"text": emb["eval"].t5, "neg": neg, **reward_inputs(eval_prompts)},
                    latent_shape=latent_shape_for(c, vae.cfg), step_config=step_config(c), reward_fns=reward_fns,
                    eval_fns=dict(reward_fns), main_reward=names[0], png_scale=1, guidance=guidance_scale(c),
                    uncond_grad=bool(s.cfg_uncond_grad), dino_size=None,
                    frames_per_call=int(c.psm.frames_per_call), fps=float(s.fps), encode=encode)


def build_wan_world(c: mlc.ConfigDict, sharding: Any = None) -> WanWorld:
    """``sharding`` places the real checkpoints as they load (see ``build_flux_world``)."""
    return build_toy_world(c) if c.world == "toy" else build_real_world(c, sharding)
