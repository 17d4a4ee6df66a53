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

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.clip.model import CLIPModel, l2_normalize

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
