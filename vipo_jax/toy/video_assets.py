"""The video toy world's committed checkpoints (``vipo_jax/toy/assets/video``, written by
``python -m vipo_jax.toy.pretrain_video``), laid out like a Wan2.1 folder: ``transformer/`` (Wan
DiT), ``vae/`` (Wan VAE), ``text_encoder/`` (a random toy UMT5, frozen) and ``tokenizer/`` (the toy
T5-style tokenizer), in vipo_jax's native layout. The frozen evaluators (DINOv2 for the PSM, the
toy CLIP and the digit classifier) are the image toy world's (``vipo_jax/toy/assets``), used per
frame."""

from __future__ import annotations

import os
from pathlib import Path

from vipo_jax.errors import CheckpointError
from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan_vae import WanVAE, WanVAEConfig
from vipo_jax.text.prompt_cache import PromptEncoder
from vipo_jax.text.tokenizers import load_tokenizer
from vipo_jax.weights.native import load_native

VIDEO_ASSETS = Path(__file__).resolve().parent / "assets" / "video"
#: The toy text encoder's sequence length: 7 caption words + the end token.
TEXT_LENGTH = 8


def video_assets_dir(path: str | os.PathLike | None = None) -> Path:
    """The video toy folder (``path`` or the committed one), checked to hold the DiT."""
    p = Path(path) if path else VIDEO_ASSETS
    if not (p / "transformer" / "model.safetensors").is_file():
        raise CheckpointError(
            f"video toy-world checkpoints not found in {p}. They ship with the package; if you deleted them, "
            f"run `python -m vipo_jax.toy.pretrain_video --out={p}` (about 25 minutes on 2 CPU cores).")
    return p


def load_video(name: str, root: str | os.PathLike | None = None, **overrides):
    """One video toy model by folder name: transformer, vae, text_encoder."""
    root = Path(root) if root else VIDEO_ASSETS
    folder = root / name
    if name == "transformer":
        return load_native(folder, "wan", WanConfig, WanTransformer, **overrides)
    if name == "vae":
        return load_native(folder, "wan_vae", WanVAEConfig, WanVAE, **overrides)
    if name == "text_encoder":
        return load_native(folder, "t5", T5Config, T5Encoder, **overrides)
    raise ValueError(f"unknown video toy model {name!r}")


def prompt_encoder(root: str | os.PathLike | None = None, text_encoder=None):
    """A :class:`~vipo_jax.text.prompt_cache.PromptEncoder` encoding like WanPipeline (attention
    mask, zero vectors after each prompt), over the toy UMT5 and tokenizer."""
    root = Path(root) if root else VIDEO_ASSETS
    t5 = text_encoder if text_encoder is not None else load_video("text_encoder", root)
    return PromptEncoder(t5, None, load_tokenizer(root / "tokenizer"), t5_max_length=TEXT_LENGTH, batch_size=64,
                         t5_attention_mask=True, zero_pad=True)
