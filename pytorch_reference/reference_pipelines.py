"""Tiny reference checkpoints written by the reference libraries in the real on-disk layouts, for the
tests and benchmarks only (never imported by training): a diffusers ``FluxPipeline`` folder
(``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``, ``model_index.json``) over the toy tokenizers, a transformers DINOv2 folder (the PSM
backbone) and a transformers ``CLIPModel`` folder (a PickScore-style reward).

A pretrained world (``config.world = "real"``) is built from these folders exactly as from the
downloaded ones. The writers return the torch modules they saved, so that a comparison can run the
reference side on the very weights our loaders read. ``torch`` is passed in (the tests' fixture sets
its threads and seed); diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vipo_jax.toy.tokenizer import build_toy_tokenizers, clip_vocab, t5_vocab

#: ``prepare(name, module)``: called on every module before it is saved (e.g. :func:`perturb_norms`)
Prepare = Callable[[str, Any], None]


def perturb_norms(model: Any, seed: int) -> None:
    """Reference inits leave norm scales at 1 and shifts at 0: randomise them, so that a norm mapped
    to the wrong place shows in a parity check."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                base = 1.0 if name.endswith((".weight", ".scale")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def clip_text_config(hidden_size: int, *, intermediate_size: int = 40, projection_dim: int = 16) -> dict:
    """A tiny CLIP text tower over the toy CLIP tokenizer's vocabulary (bos / eos / pad ids as
    FLUX's ``tokenizer/``: padding with eos, eos the highest id), 77 positions like CLIP-L."""
    v = clip_vocab()
    return dict(vocab_size=len(v), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=v["<|startoftext|>"],
                eos_token_id=v["<|endoftext|>"], pad_token_id=v["<|endoftext|>"], projection_dim=projection_dim)


def t5_config(d_model: int) -> dict:
    """A tiny T5 encoder over the toy T5 tokenizer's vocabulary (pad 0, eos 1, a few spare ids)."""
    return dict(vocab_size=len(t5_vocab()) + 7, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def write_flux_pipeline(torch: Any, root: str | Path, *, transformer: dict, vae: dict, t5_dim: int, clip_dim: int,
                        dtype: Any = "bfloat16", seed: int = 0, prepare: Prepare | None = None) -> dict[str, Any]:
    """A diffusers FLUX.1 pipeline folder at ``root`` (``FluxPipeline.save_pretrained``) with random
    weights: ``FluxTransformer2DModel(**transformer)`` (its ``joint_attention_dim`` must be ``t5_dim``,
    its ``pooled_projection_dim`` ``clip_dim``), ``AutoencoderKL(**vae)``, a tiny CLIP text encoder
    (width ``clip_dim``) and T5 encoder (width ``t5_dim``) with the toy tokenizers, and FLUX.1-dev's
    scheduler. ``prepare(name, module)`` runs on each of ``transformer``, ``vae``, ``text_encoder``,
    ``text_encoder_2`` before saving; the weights are saved in ``dtype`` (FLUX.1-dev ships bf16).
    Returns those four modules (in ``dtype``, eval mode) by name."""
    import diffusers
    import transformers as tf

    root = Path(root)
    if transformer.get("joint_attention_dim", t5_dim) != t5_dim or \
            transformer.get("pooled_projection_dim", clip_dim) != clip_dim:
        raise ValueError("the transformer's joint_attention_dim / pooled_projection_dim must be t5_dim / clip_dim")
    torch.manual_seed(seed)
    modules = {
        "transformer": diffusers.FluxTransformer2DModel(**transformer),
        "vae": diffusers.AutoencoderKL(**vae),
        "text_encoder": tf.CLIPTextModel(tf.CLIPTextConfig(**clip_text_config(clip_dim))),
        "text_encoder_2": tf.T5EncoderModel(tf.T5Config(**t5_config(t5_dim))),
    }
    if prepare is not None:
        for name, module in modules.items():
            prepare(name, module)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    clip_tok, t5_tok = build_toy_tokenizers(root / "_tok")
    pipe = diffusers.FluxPipeline(scheduler=scheduler, tokenizer=tf.AutoTokenizer.from_pretrained(clip_tok),
                                  tokenizer_2=tf.AutoTokenizer.from_pretrained(t5_tok), **modules)
    dtype = _torch_dtype(torch, dtype)
    if dtype != torch.float32:  # (the modules are built in float32)
        pipe.to(dtype)
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "_tok")
    build_toy_tokenizers(root)  # the loadable-offline versions (tokenizer_config class name fixed)
    return {name: module.eval() for name, module in modules.items()}


def write_dinov2(torch: Any, folder: str | Path, *, config: dict, seed: int, prepare: Prepare | None = None) -> Any:
    """A transformers DINOv2 folder (``Dinov2Model(Dinov2Config(**config)).save_pretrained``) with
    random weights; ``prepare("dinov2", model)`` runs before saving. Returns the model (eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Dinov2Model(tf.Dinov2Config(**config))
    if prepare is not None:
        prepare("dinov2", model)
    model.save_pretrained(Path(folder))
    return model.eval()


def write_clip_model(torch: Any, folder: str | Path, *, text: dict, vision: dict, projection_dim: int,
                     seed: int) -> Any:
    """A transformers ``CLIPModel`` folder (the layout of PickScore / CLIP-L) with random weights, e.g.
    ``text=clip_text_config(32, intermediate_size=37)`` over the toy CLIP tokenizer. Returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(Path(folder))
    return model.eval()
