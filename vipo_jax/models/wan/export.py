"""Export of a Wan2.1 T2V DiT as a diffusers ``WanTransformer3DModel`` folder
(``WanTransformer3DModel.from_pretrained(folder)``).

:func:`to_diffusers` is the exact inverse of :func:`vipo_jax.models.wan.convert.convert_diffusers`:
the scanned ``blocks`` stack is unstacked into ``blocks.{i}.*``, Linear kernels are transposed back
to ``(out, in)``, ``patch_embedding``'s channels-last Conv3d kernel ``(t, h, w, in, out)`` goes back
to ``(out, in, t, h, w)`` and the modulation tables regain their leading 1. Values are bit-identical.

Like the FLUX exporter (whose streaming machinery this module shares), the result is lazy and
:func:`save_diffusers` writes tensor by tensor: besides the model, the host holds a few copies of one
tensor at most, whatever the depth (the 14B's largest, an FFN projection, is 13824 x 5120: 283 MB in
float32; a 14B-width model's export peaked at +0.6 GB of RSS in float32, +0.9 GB casting to bfloat16).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.models.config_io import architecture_dict
from vipo_jax.models.flux.export import (
    DEFAULT_MAX_SHARD_SIZE,
    LayoutBuilder,
    LazyTensors,
    save_diffusers_folder,
    source_and_config,
    target_dtypes,
)
from vipo_jax.models.wan.config import CLASS_NAME, WanConfig

__all__ = ["FP32_MODULES", "diffusers_config", "keeps_fp32", "save_diffusers", "to_diffusers"]

#: the first diffusers release with ``WanTransformer3DModel`` (written as ``_diffusers_version``)
WAN_DIFFUSERS_VERSION = "0.33.0"
#: diffusers' ``WanTransformer3DModel._keep_in_fp32_modules``: module names (a key component) that
#: diffusers keeps in float32 whatever ``torch_dtype``; :func:`save_diffusers` keeps them float32 too
FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def diffusers_config(cfg: WanConfig) -> dict[str, Any]:
    """``config.json`` of a diffusers ``WanTransformer3DModel`` with ``cfg``'s architecture (every
    ``__init__`` argument; the runtime options are not written)."""
    arch = architecture_dict(cfg)
    arch["patch_size"] = list(arch["patch_size"])
    return {"_class_name": CLASS_NAME, "_diffusers_version": WAN_DIFFUSERS_VERSION, **arch}


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    """flax Conv3d kernel (t, h, w, in, out) -> torch (out, in, t, h, w)."""
    return np.transpose(k, (4, 3, 0, 1, 2))


def to_diffusers(model_or_state: Any, cfg: WanConfig | None = None) -> LazyTensors:
    """Our Wan DiT -> diffusers ``WanTransformer3DModel`` state dict (numpy, torch layout), the
    inverse of ``convert_diffusers``. ``model_or_state``: a :class:`WanTransformer`, its ``nnx.State``
    or ``{nnx path: array}``; ``cfg`` defaults to the model's. Lazy: ``dict(...)`` it to materialise."""
    src, cfg = source_and_config(model_or_state, cfg, WanConfig)
    x = LayoutBuilder(src)
    d, n = cfg.inner_dim, cfg.num_layers
    pt, ph, pw = cfg.patch_size

    x.vector("scale_shift_table", "scale_shift_table", (2, d), out_shape=(1, 2, d))
    src.expect("patch_embedding.kernel", (pt, ph, pw, cfg.in_channels, d))
    x.put("patch_embedding.weight", "patch_embedding.kernel", (), (d, cfg.in_channels, pt, ph, pw), _conv_to_torch)
    x.vector("patch_embedding.bias", "patch_embedding.bias", (d,))
    ce = "condition_embedder"
    x.dense(f"{ce}.time_embedder.linear_1", f"{ce}.time_embedder.linear_1", cfg.freq_dim, d)
    x.dense(f"{ce}.time_embedder.linear_2", f"{ce}.time_embedder.linear_2", d, d)
    x.dense(f"{ce}.time_proj", f"{ce}.time_proj", d, 6 * d)
    x.dense(f"{ce}.text_embedder.linear_1", f"{ce}.text_embedder.linear_1", cfg.text_dim, d)
    x.dense(f"{ce}.text_embedder.linear_2", f"{ce}.text_embedder.linear_2", d, d)

    for i in range(n):
        p = f"blocks.{i}."
        lay = dict(layer=i, n_layers=n)
        x.vector(p + "scale_shift_table", "blocks.scale_shift_table", (6, d), out_shape=(1, 6, d), **lay)
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                x.dense(f"{p}{attn}.{proj}", f"blocks.{attn}.{proj}", d, d, **lay)
            x.dense(f"{p}{attn}.to_out.0", f"blocks.{attn}.to_out", d, d, **lay)
            x.vector(f"{p}{attn}.norm_q.weight", f"blocks.{attn}.norm_q.scale", (d,), **lay)
            x.vector(f"{p}{attn}.norm_k.weight", f"blocks.{attn}.norm_k.scale", (d,), **lay)
        if cfg.cross_attn_norm:
            x.vector(p + "norm2.weight", "blocks.norm2.scale", (d,), **lay)
            x.vector(p + "norm2.bias", "blocks.norm2.bias", (d,), **lay)
        x.dense(p + "ffn.net.0.proj", "blocks.ffn.linear_in", d, cfg.ffn_dim, **lay)
        x.dense(p + "ffn.net.2", "blocks.ffn.linear_out", cfg.ffn_dim, d, **lay)

    x.dense("proj_out", "proj_out", d, cfg.out_dim)
    return x.done()


def keeps_fp32(key: str) -> bool:
    """Whether diffusers keeps the module holding ``key`` in float32 (:data:`FP32_MODULES`)."""
    return any(m in key.split(".") for m in FP32_MODULES)


def save_diffusers(model: Any, folder: str | os.PathLike, *, dtype: Any = None, cfg: WanConfig | None = None,
                   keep_fp32: bool = True, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``model`` as a diffusers ``WanTransformer3DModel`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, sharded with an index above ``max_shard_size``, 10 GB by
    default like diffusers). ``dtype`` ("bfloat16", ...) casts the tensors, except, with
    ``keep_fp32`` (default), those diffusers itself keeps in float32 (the time embedder and the
    modulation tables and cross-attention norms, :data:`FP32_MODULES`), which keep the model's
    dtype. Streams tensor by tensor. Returns the files written."""
    tensors = to_diffusers(model, cfg)
    cfg = cfg or model.cfg
    dtypes = target_dtypes(tensors, dtype, keep=keeps_fp32 if keep_fp32 else None)
    return save_diffusers_folder(folder, tensors, diffusers_config(cfg), dtypes=dtypes, max_shard_size=max_shard_size)
