"""ImageReward (THUDM/ImageReward v1.0), the paper's out-of-domain metric, scored on device.

The reference (``ImageReward.ImageReward.score``) tokenizes the prompt with bert-base-uncased plus
BLIP's [DEC] / [ENC] tokens (``padding="max_length", truncation=True, max_length=35``), transforms
the image with ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor()`` and
``Normalize`` with the OpenAI CLIP mean / std (the values BLIP uses), and returns
``(mlp(text_encoder(ids, image_tokens)[:, 0]) - mean) / std``. :func:`preprocess` is that image
pipeline on [0, 1] NHWC float batches: the antialiased bicubic resize of the shortest side and
torchvision's centre crop of :func:`vipo_jax.rewards.clip_scores.preprocess` (see there for how it
compares with PIL on uint8 images).

Entry points:

* :func:`image_reward_score` ``(model, images01, input_ids, attention_mask) -> (B,)``, and
  :func:`make_score_fn` ``(graphdef) -> (params, images01, input_ids, attention_mask) -> (B,)``:
  pure and jittable, for use inside a jitted evaluation or reward function;
* :class:`ImageRewardScorer`: ``ImageRewardScorer.from_folder(folder, tokenizer=...)`` then
  ``.score(images01, prompts)`` -> numpy (B,), jitted per image shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError, DataError
from vipo_jax.models.blip import from_pretrained as load_image_reward
from vipo_jax.models.blip.config import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD
from vipo_jax.models.blip.model import ImageRewardModel
from vipo_jax.rewards.clip_scores import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vipo_jax.rewards.clip_scores import preprocess as _clip_preprocess
from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register
from vipo_jax.text.tokenizers import tokenize

BLIP_MEAN = OPENAI_CLIP_MEAN
BLIP_STD = OPENAI_CLIP_STD
MAX_LENGTH = 35

__all__ = ["BLIP_MEAN", "BLIP_STD", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "MAX_LENGTH", "ImageRewardScorer",
           "image_reward_score", "load_blip_tokenizer", "make_score_fn", "preprocess"]

ScoreFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]


def preprocess(images: jax.Array, image_size: int = 224, *, clamp: bool = True) -> jax.Array:
    """[0, 1] NHWC images -> normalised NHWC ``(B, image_size, image_size, 3)`` float32 pixels:
    bicubic antialiased resize of the shortest side, centre crop, BLIP normalisation."""
    return _clip_preprocess(images, image_size, mean=BLIP_MEAN, std=BLIP_STD, clamp=clamp)


def image_reward_score(model: ImageRewardModel, images01: jax.Array, input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> jax.Array:
    """ImageReward of each image with its prompt, (B,) float32. ``input_ids`` / ``attention_mask``
    are (B, L) or (1, L) / (L,) for one prompt shared by every image."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask).reshape(input_ids.shape)
    b = images01.shape[0]
    if input_ids.shape[0] not in (1, b):
        raise ValueError(f"{b} images but {input_ids.shape[0]} prompts: give one prompt per image or one")
    if input_ids.shape[0] != b:
        input_ids = jnp.broadcast_to(input_ids, (b, input_ids.shape[1]))
        if attention_mask is not None:
            attention_mask = jnp.broadcast_to(attention_mask, input_ids.shape)
    pixels = preprocess(images01, model.cfg.vision_config.image_size)
    return model(pixels, input_ids, attention_mask)


def make_score_fn(graphdef: nnx.GraphDef) -> ScoreFn:
    """``fn(params, images01, input_ids, attention_mask) -> (B,)`` over the parameter state of
    ``nnx.split(model)``: pure, so it can be jitted, vmapped or called inside another jit."""

    def fn(params, images01, input_ids, attention_mask=None):
        return image_reward_score(nnx.merge(graphdef, params), images01, input_ids, attention_mask)

    return fn


def load_blip_tokenizer(folder: str | os.PathLike) -> Any:
    """BLIP's tokenizer (``init_tokenizer`` in BLIP / ImageReward): bert-base-uncased from a local
    folder, plus ``[DEC]`` as bos token and ``[ENC]`` as an additional special token (ids 30522 and
    30523 with the real vocabulary)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"tokenizer folder not found: {folder}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot load a BERT tokenizer from {folder}: {e}") from e
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer:
    """A loaded ImageReward model with its tokenizer.

    ``scorer = ImageRewardScorer.from_folder(folder, tokenizer=bert_folder)``;
    ``scorer.score(images01, prompts)`` -> numpy (B,) for [0, 1] NHWC images and one prompt per
    image (or one for all). ``scorer.score_fn`` / ``scorer.params`` are the pure function and its
    parameters, for callers that jit their own evaluation."""

    def __init__(self, model: ImageRewardModel, tokenizer: Any = None, *, max_length: int | None = None):
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.score_fn: ScoreFn = make_score_fn(self.graphdef)
        self._jit = jax.jit(self.score_fn)
        self.max_length = int(max_length or self.cfg.max_length)
        self.tokenizer = None
        if tokenizer is not None:
            self.tokenizer = load_blip_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) \
                else tokenizer
            n, vocab = len(self.tokenizer), self.cfg.text_config.vocab_size
            if n != vocab:
                raise CheckpointError(f"tokenizer has {n} tokens but the text encoder's vocabulary is {vocab}: "
                                      "ImageReward needs bert-base-uncased plus BLIP's [DEC] / [ENC] "
                                      "(load_blip_tokenizer)")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer: str | os.PathLike | Any = None, *,
                    param_dtype: Any = None, dtype: Any = None, sharding: Any = None,
                    **overrides: Any) -> ImageRewardScorer:
        """Load a converted folder (``python -m vipo_jax.convert image-reward``). ``tokenizer``: a
        local bert-base-uncased folder or a tokenizer object; by default ``folder/tokenizer``."""
        folder = Path(folder)
        model = load_image_reward(folder, param_dtype=param_dtype, dtype=dtype, sharding=sharding, **overrides)
        if tokenizer is None:
            tokenizer = folder / "tokenizer"
            if not tokenizer.is_dir():
                raise DataError(f"no tokenizer: pass tokenizer=<local bert-base-uncased folder> or put it in "
                                f"{tokenizer}")
        return cls(model, tokenizer)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` int32 (P, max_length), padded and truncated as the
        reference."""
        if self.tokenizer is None:
            raise DataError("this ImageRewardScorer has no tokenizer; pass one, or use score_tokens")
        return tokenize(self.tokenizer, prompts, self.max_length)

    def score_tokens(self, images01: jax.Array, input_ids: jax.Array,
                     attention_mask: jax.Array | None = None) -> jax.Array:
        """Scores from token ids (jitted; recompiles for new shapes)."""
        return self._jit(self.params, jnp.asarray(images01), jnp.asarray(input_ids),
                         None if attention_mask is None else jnp.asarray(attention_mask))

    def score(self, images01: jax.Array | np.ndarray, prompts: str | Sequence[str]) -> np.ndarray:
        """ImageReward of ``images01[i]`` with ``prompts[i]`` (or the one prompt), numpy (B,)."""
        ids, mask = self.tokenize(prompts)
        return np.asarray(self.score_tokens(images01, ids, mask))


# --- registry entry ------------------------------------------------------------------------------------
def _check(ctx: RewardContext) -> None:
    path = str(ctx.config.rewards.get("image_reward", "") or "")
    if not path or not Path(path).exists():
        raise CheckpointError(f"reward model for image_reward not found: --config.rewards.image_reward={path!r} "
                              "(a folder made by `python -m vipo_jax.convert image-reward`)")


def _load(ctx: RewardContext) -> LoadedReward:
    c = ctx.config
    _check(ctx)
    path = str(c.rewards.image_reward)
    tok = c.rewards.get("image_reward_tokenizer", "") or None
    scorer = ImageRewardScorer.from_folder(path, tokenizer=tok, param_dtype=ctx.dtype, sharding=ctx.sharding)

    def score(params, images, batch):
        return scorer.score_fn(params, images, batch["ir_ids"], batch["ir_mask"])

    def prompt_inputs(texts: list[str]) -> dict:
        ids, mask = scorer.tokenize(texts)
        return {"ir_ids": ids, "ir_mask": mask}

    length = scorer.max_length
    return LoadedReward(score=score, params=scorer.params, prompt_inputs=prompt_inputs,
                        input_specs={"ir_ids": jax.ShapeDtypeStruct((length,), jnp.int32),
                                     "ir_mask": jax.ShapeDtypeStruct((length,), jnp.int32)})


register(RewardEntry("image_reward", _load, "ImageReward v1.0 (BLIP; the paper's out-of-domain metric); "
                     "--config.rewards.image_reward=<python -m vipo_jax.convert image-reward output>",
                     sources=("pretrained",), path_key="image_reward", check=_check))
