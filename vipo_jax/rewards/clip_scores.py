"""CLIP-family image-text rewards computed on device: HPSv2.1, PickScore and CLIP score.

Images come in as float batches in [0, 1], NHWC (what the VAE decoder gives after ``x/2+0.5``).
:func:`preprocess` reproduces the reference pipelines (torchvision ``Resize(size, BICUBIC)`` +
``CenterCrop`` for open_clip / HPSv2, transformers ``CLIPImageProcessor`` for PickScore) with
``jax.image.resize(method="bicubic", antialias=True)``: the same Keys cubic (a = -0.5) kernel,
stretched by the downscale factor and renormalised at the borders, as PIL and
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``. Against the latter it agrees
to ~2e-6 after normalisation, i.e. float32 rounding (tests/test_clip.py).

Remaining differences from the references, which resize saved uint8 images: the image is
quantised to 1/255 before resizing and (PIL) the result rounded to 1/255 again, up to ~2e-3 per
pixel each time, and PIL uses fixed-point (22-bit) weights; we stay in float. ``clamp=True`` (the
default) clips the input and the resized image to [0, 1], as uint8 images implicitly are.
Centre-crop offsets follow torchvision's ``CenterCrop`` (``round((h - size) / 2)``, open_clip /
HPSv2); transformers' processors use ``(h - size) // 2``, one pixel apart only when the overhang
is odd (never for square images).

Scores (per image, shape (B,)):

* ``hps_v21_score``: HPSv2 / HPSv2.1 = cosine similarity of the L2-normalised image and text
  features of the open_clip ViT-H-14 model (``logit_scale`` not applied).
* ``pickscore``: ``exp(logit_scale) * cosine`` with the PickScore_v1 CLIP-H model (~20-23).
* ``clip_score``: ``100 * max(cosine, 0)``, the torchmetrics ``CLIPScore`` convention
  (``raw=True`` gives the plain cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.models.clip import from_pretrained as load_clip
from vipo_jax.models.clip.config import OPEN_CLIP_CONFIGS, config_from_open_clip
from vipo_jax.models.clip.model import CLIPModel, l2_normalize
from vipo_jax.rewards.frames import per_frame_scores
from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register
from vipo_jax.text.tokenizers import load_tokenizer, tokenize
from vipo_jax.weights.loading import init_model

Array = jax.Array
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KINDS = ("hps_v21", "pickscore", "clip_score")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shortest side -> ``size``, the other scaled and truncated (torchvision / transformers)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess(images: jax.Array, image_size: int, *, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD, clamp: bool = True) -> jax.Array:
    """[0, 1] NHWC images -> normalised NHWC ``(B, image_size, image_size, C)`` float32 pixels:
    bicubic antialiased resize of the shortest side to ``image_size``, centre crop, then
    ``(x - mean) / std``. Differentiable (the clamps aside)."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (batch, height, width, channels), got {images.shape}")
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    if clamp:
        x = jnp.clip(x, 0.0, 1.0)
    nh, nw = resized_shape(h, w, image_size)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
        if clamp:
            x = jnp.clip(x, 0.0, 1.0)
    top = int(round((nh - image_size) / 2.0))
    left = int(round((nw - image_size) / 2.0))
    x = x[:, top:top + image_size, left:left + image_size]
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x - mean) / std


def image_embeds(model: CLIPModel, images: jax.Array, **preprocess_kw) -> jax.Array:
    """L2-normalised image features of [0, 1] NHWC images, (B, projection_dim) float32."""
    pixels = preprocess(images, model.cfg.vision_config.image_size, **preprocess_kw)
    return l2_normalize(model.get_image_features(pixels))


def text_embeds(model: CLIPModel, text_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """L2-normalised text features, (T, projection_dim) float32. ``text_ids`` (T, L) or (L,)."""
    text_ids = jnp.asarray(text_ids)
    if text_ids.ndim == 1:
        text_ids = text_ids[None]
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)[None]
    return l2_normalize(model.get_text_features(text_ids, attention_mask))


def _from_cosine(model: CLIPModel, cos: jax.Array, kind: str) -> jax.Array:
    if kind not in KINDS:
        raise ValueError(f"unknown CLIP reward {kind!r}; choose one of {KINDS}")
    if kind == "hps_v21":
        return cos
    if kind == "pickscore":
        return jnp.exp(model.logit_scale[...].astype(jnp.float32)) * cos
    return 100.0 * jnp.maximum(cos, 0.0)


def score_from_embeds(model: CLIPModel, img: jax.Array, txt: jax.Array, kind: str) -> jax.Array:
    """Row-wise scores of paired (or broadcast, when ``txt`` has one row) normalised features."""
    return _from_cosine(model, jnp.sum(img * txt, axis=-1), kind)


def _score(model, images, text_ids, attention_mask, kind, **kw):
    img = image_embeds(model, images, **kw)
    txt = text_embeds(model, text_ids, attention_mask)
    if txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} texts: give one text per image or one")
    return score_from_embeds(model, img, txt, kind)


def hps_v21_score(model: CLIPModel, images: jax.Array, text_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """HPSv2.1 score (cosine of normalised features) of each image with its prompt, (B,)."""
    return _score(model, images, text_ids, attention_mask, "hps_v21")


def pickscore(model: CLIPModel, images: jax.Array, text_ids: jax.Array,
              attention_mask: jax.Array | None = None) -> jax.Array:
    """PickScore: ``exp(logit_scale) * cosine`` of each image with its prompt, (B,)."""
    return _score(model, images, text_ids, attention_mask, "pickscore")


def clip_score(model: CLIPModel, images: jax.Array, text_ids: jax.Array,
               attention_mask: jax.Array | None = None, *, raw: bool = False) -> jax.Array:
    """CLIP score ``100 * max(cosine, 0)`` (torchmetrics), or the cosine with ``raw=True``; (B,)."""
    cos = _score(model, images, text_ids, attention_mask, "hps_v21")
    return cos if raw else 100.0 * jnp.maximum(cos, 0.0)


@nnx.jit
def _jit_text(model, text_ids, attention_mask):
    return text_embeds(model, text_ids, attention_mask)


@nnx.jit
def _jit_cosine(model, images, txt):
    return jnp.sum(image_embeds(model, images) * txt, axis=-1)


class CLIPRewardModel:
    """A CLIP model with a fixed set of tokenized prompts, whose text features are computed once.

    ``reward = CLIPRewardModel(model, prompt_ids, kind="hps_v21")``;
    ``reward(images, prompt_index)`` -> (B,) scores of ``images[i]`` against prompt
    ``prompt_index[i]`` (jitted; recompiles only for new image shapes)."""

    def __init__(self, model: CLIPModel, text_ids: jax.Array, *, kind: str = "hps_v21",
                 attention_mask: jax.Array | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown CLIP reward {kind!r}; choose one of {KINDS}")
        self.model = model
        self.kind = kind
        text_ids = jnp.asarray(text_ids, jnp.int32)
        self.text_ids = text_ids if text_ids.ndim == 2 else text_ids[None]
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).reshape(self.text_ids.shape)
        self.text_embeds = _jit_text(model, self.text_ids, attention_mask)

    @property
    def num_prompts(self) -> int:
        return int(self.text_embeds.shape[0])

    def __call__(self, images: jax.Array, prompt_index: jax.Array | None = None) -> jax.Array:
        if prompt_index is None:
            if self.num_prompts not in (1, images.shape[0]):
                raise ValueError(f"{images.shape[0]} images and {self.num_prompts} prompts: "
                                 "pass prompt_index")
            txt = self.text_embeds
        else:
            txt = self.text_embeds[jnp.asarray(prompt_index)]
        return _from_cosine(self.model, _jit_cosine(self.model, images, txt), self.kind)


# --- CLIP-family rewards per video frame --------------------------------------------------------------
def clip_family_video(model: Any, videos: Array, text_ids: Array, kind: str, *, frame_stride: int = 1,
                      frames_per_call: int = 0, attention_mask: Array | None = None) -> Array:
    """Mean over frames of an image-text score (``kind``: hps_v21, pickscore, clip_score) of each
    video with its prompt, (B,). The text features are computed once per video, not per frame."""
    txt = text_embeds(model, text_ids, attention_mask)  # (B, P)

    def frame_fn(_, images, rows):
        return score_from_embeds(model, image_embeds(model, images), rows["txt"], kind)

    return jnp.mean(per_frame_scores(frame_fn, None, videos, {"txt": txt}, frame_stride=frame_stride,
                                     frames_per_call=frames_per_call), axis=1)


def hps_v21_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """HPSv2.1 averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "hps_v21", **kw)


def pickscore_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """PickScore averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "pickscore", **kw)


def clip_score_video(model: Any, videos: Array, text_ids: Array, **kw: Any) -> Array:
    """CLIP score (``100 * max(cos, 0)``) averaged over frames, (B,)."""
    return clip_family_video(model, videos, text_ids, "clip_score", **kw)


# --- registry entries ----------------------------------------------------------------------------------
#: Shapes of the reward models the planner and random-weight benchmarks build (open_clip configs).
ABSTRACT_MODELS = {"hpsv21": "ViT-H-14", "pickscore": "ViT-H-14", "clip_score": "ViT-L-14"}
CLIP_TEXT_LENGTH = 77


def clip_tokenizer_folder(c: Any) -> Path:
    """The CLIP tokenizer the CLIP-family rewards tokenize prompts with: ``rewards.clip_tokenizer``,
    or a FLUX.1 folder's ``tokenizer/`` (the same CLIP-L tokenizer)."""
    given = str(c.rewards.get("clip_tokenizer", "") or "")
    if given:
        if not Path(given).is_dir():
            raise CheckpointError(f"--config.rewards.clip_tokenizer={given!r} is not a folder")
        return Path(given)
    if c.model.family == "flux" and c.model.path and (Path(c.model.path) / "tokenizer").is_dir():
        return Path(c.model.path) / "tokenizer"
    raise CheckpointError(
        "--config.rewards.clip_tokenizer is empty: give a CLIP tokenizer folder (e.g. the tokenizer files of "
        "openai/clip-vit-large-patch14 or of a FLUX.1 folder's tokenizer/) to tokenize prompts for the "
        "CLIP-family rewards")


def _clip_reward_check(name: str):
    def check(ctx: RewardContext) -> None:
        path = str(ctx.config.rewards.get(name, "") or "")
        if not path or not Path(path).exists():
            raise CheckpointError(f"reward model for {name} not found: --config.rewards.{name}={path!r}")
        clip_tokenizer_folder(ctx.config)

    return check


def _clip_reward_loader(name: str, kind: str):
    def load(ctx: RewardContext) -> LoadedReward:
        c = ctx.config
        if ctx.source in ("abstract", "random"):
            cfg = config_from_open_clip(OPEN_CLIP_CONFIGS[ABSTRACT_MODELS[name]], dtype=ctx.dtype)
            model = init_model(CLIPModel, cfg, abstract=ctx.abstract)
            prompt_inputs = None
        else:
            _clip_reward_check(name)(ctx)
            model = load_clip(str(c.rewards[name]), param_dtype=ctx.dtype, sharding=ctx.sharding)
            tok = load_tokenizer(clip_tokenizer_folder(c))

            def prompt_inputs(texts: list[str]) -> dict:
                return {"reward_ids": tokenize(tok, texts, CLIP_TEXT_LENGTH)[0]}

        graphdef, params = nnx.split(model)
        stride = int(c.rewards.get("frame_stride", 1))
        per_call = int(c.rewards.get("frames_per_call", 0))

        def score(p, images, batch):
            return _score(nnx.merge(graphdef, p), images, batch["reward_ids"], None, kind)

        def video_score(p, videos, batch):
            return clip_family_video(nnx.merge(graphdef, p), videos, batch["reward_ids"], kind, frame_stride=stride,
                                     frames_per_call=per_call)

        return LoadedReward(score=score, params=params, prompt_inputs=prompt_inputs, video_score=video_score,
                            input_specs={"reward_ids": jax.ShapeDtypeStruct((CLIP_TEXT_LENGTH,), jnp.int32)})

    return load


_REAL = ("pretrained", "random", "abstract")
register(RewardEntry("hpsv21", _clip_reward_loader("hpsv21", "hps_v21"),
                     "HPSv2.1: cosine of open_clip ViT-H-14 image and prompt features (the paper's Flux reward); "
                     "--config.rewards.hpsv21=<python -m vipo_jax.convert hps output>", sources=_REAL,
                     path_key="hpsv21", check=_clip_reward_check("hpsv21")))
register(RewardEntry("pickscore", _clip_reward_loader("pickscore", "pickscore"),
                     "PickScore_v1: exp(logit_scale) x cosine of a CLIP-H; --config.rewards.pickscore=<HF folder>",
                     sources=_REAL, path_key="pickscore",
                     check=_clip_reward_check("pickscore")))
register(RewardEntry("clip_score", _clip_reward_loader("clip_score", "clip_score"),
                     "CLIP score 100 x max(cosine, 0); --config.rewards.clip_score=<HF CLIPModel folder>",
                     sources=_REAL, path_key="clip_score",
                     check=_clip_reward_check("clip_score")))
