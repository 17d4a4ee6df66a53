"""Loading the toy world's committed checkpoints (``vipo_jax/toy/assets``, written by
``python -m vipo_jax.toy.pretrain``), and encoding toy prompts with its text encoders."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.clip import CLIPModel
from vipo_jax.models.clip.config import CLIPConfig
from vipo_jax.models.dinov2 import Dinov2Config, Dinov2Model
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from vipo_jax.text.tokenizers import load_tokenizer, tokenize
from vipo_jax.toy.classifier import DigitClassifier, DigitClassifierConfig
from vipo_jax.toy.tokenizer import CLIP_MAX_LENGTH, T5_MAX_LENGTH
from vipo_jax.weights.native import load_native

ASSETS = Path(__file__).resolve().parent / "assets"


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path else ASSETS
    if not (p / "transformer" / "model.safetensors").is_file():
        raise CheckpointError(
            f"toy-world checkpoints not found in {p}. They ship with the package; if you deleted them, "
            "run `python -m vipo_jax.toy.pretrain --out=" + str(p) + "` (about 20 minutes on 2 CPU cores).")
    return p


def load(name: str, root: str | os.PathLike | None = None, **overrides):
    """One toy model by folder name: transformer, vae, text_encoder_2, clip, dinov2, classifier,
    classifier_eval (the second, independently trained digit classifier)."""
    root = Path(root) if root else ASSETS
    folder = root / name
    if name == "transformer":
        return load_native(folder, "flux", FluxConfig, FluxTransformer, **overrides)
    if name == "vae":
        return load_native(folder, "vae", AutoencoderKLConfig, AutoencoderKL, **overrides)
    if name == "text_encoder_2":
        return load_native(folder, "t5", T5Config, T5Encoder, **overrides)
    if name == "clip":
        return load_native(folder, "clip", CLIPConfig, CLIPModel, **overrides)
    if name == "dinov2":
        return load_native(folder, "dinov2", Dinov2Config, Dinov2Model, **overrides)
    if name in ("classifier", "classifier_eval"):
        return load_native(folder, "digit_classifier", DigitClassifierConfig, DigitClassifier, **overrides)
    raise ValueError(f"unknown toy model {name!r}")


def encode_conditioning(prompts: list[str], root: str | os.PathLike | None = None, t5=None, clip=None) -> dict:
    """Per-prompt conditioning as the Flux pipeline builds it: T5 hidden states (no mask, like
    FluxPipeline) and the CLIP text tower's pooled output, float32 numpy arrays."""
    root = Path(root) if root else ASSETS
    t5 = t5 or load("text_encoder_2", root)
    clip = clip or load("clip", root)
    clip_ids, _ = tokenize(load_tokenizer(root / "tokenizer"), prompts, CLIP_MAX_LENGTH)
    t5_ids, _ = tokenize(load_tokenizer(root / "tokenizer_2"), prompts, T5_MAX_LENGTH)
    t5_emb = jax.jit(lambda ids: t5(ids))(jnp.asarray(t5_ids))
    pooled = jax.jit(lambda ids: clip.text_model(ids)[1])(jnp.asarray(clip_ids))
    return {"t5": np.asarray(t5_emb, np.float32), "pooled": np.asarray(pooled, np.float32)}


def encode_prompts(prompts: list[str], root: str | os.PathLike | None = None, t5=None, clip=None) -> dict:
    """:func:`encode_conditioning` plus the toy CLIP token ids of the prompts (``clip_ids``)."""
    root = Path(root) if root else ASSETS
    clip_ids, _ = tokenize(load_tokenizer(root / "tokenizer"), prompts, CLIP_MAX_LENGTH)
    return {**encode_conditioning(prompts, root, t5, clip), "clip_ids": np.asarray(clip_ids, np.int32)}
