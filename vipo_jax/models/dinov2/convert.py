"""transformers DINOv2 checkpoints (``Dinov2Model`` / ``Dinov2WithRegistersModel`` safetensors)
-> dotted nnx paths of :class:`Dinov2Model`, and the loader."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.dinov2.config import Dinov2Config
from vipo_jax.weights.loading import SourceKeys, conv, linear

# heads of task models (Dinov2ForImageClassification, backbones) are stripped to the base model
_PREFIXES = ("dinov2.", "dinov2_with_registers.", "model.")


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    if "embeddings.cls_token" in tensors:
        return tensors
    for p in _PREFIXES:
        if p + "embeddings.cls_token" in tensors:
            return {k[len(p):]: tensors[k] for k in tensors if k.startswith(p)}
    return tensors


def expected_shapes(cfg: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers DINOv2 checkpoint for ``cfg``, with its shape."""
    d, m, p = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, cfg.num_positions + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, cfg.num_channels, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    if cfg.use_mask_token:
        shapes["embeddings.mask_token"] = (1, d)
    if cfg.num_register_tokens:
        shapes["embeddings.register_tokens"] = (1, cfg.num_register_tokens, d)
    linears = {f"attention.attention.{n}": (d, d) for n in ("query", "key", "value")}
    linears["attention.output.dense"] = (d, d)
    if cfg.use_swiglu_ffn:
        linears.update({"mlp.weights_in": (2 * m, d), "mlp.weights_out": (d, m)})
    else:
        linears.update({"mlp.fc1": (m, d), "mlp.fc2": (d, m)})
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for name, (o, n) in linears.items():
            shapes[pre + name + ".weight"] = (o, n)
            if cfg.qkv_bias or not name.startswith("attention.attention."):
                shapes[pre + name + ".bias"] = (o,)
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                     "layer_scale1.lambda1", "layer_scale2.lambda1"):
            shapes[pre + name] = (d,)
    return shapes


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: Dinov2Config) -> dict[str, np.ndarray]:
    """transformers DINOv2 state dict -> ``{"dotted.nnx.path": array}``. Missing keys, unexpected
    keys and shape mismatches raise :class:`CheckpointError` naming the checkpoint key."""
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors)
    want = expected_shapes(cfg)

    def take(key: str) -> np.ndarray:
        if key in src and src.shape(key) != want[key]:
            raise CheckpointError(
                f"shape mismatch for {key!r} in {src.where}: checkpoint has {src.shape(key)}, "
                f"the config expects {want[key]} (wrong config.json?)"
            )
        return src.take(key)

    layers = [f"encoder.layer.{i}." for i in range(cfg.num_hidden_layers)]

    def stack(suffix: str, fn=None) -> np.ndarray:
        arrays = [take(p + suffix) for p in layers]
        return np.stack([fn(a) for a in arrays] if fn else arrays)

    out: dict[str, np.ndarray] = {}
    out["embeddings.cls_token"] = take("embeddings.cls_token")
    if cfg.use_mask_token:
        out["embeddings.mask_token"] = take("embeddings.mask_token")
    if cfg.num_register_tokens:
        out["embeddings.register_tokens"] = take("embeddings.register_tokens")
    out["embeddings.position_embeddings"] = take("embeddings.position_embeddings")
    out["embeddings.patch_embeddings.kernel"] = conv(take("embeddings.patch_embeddings.projection.weight"))
    out["embeddings.patch_embeddings.bias"] = take("embeddings.patch_embeddings.projection.bias")

    qkv = {"attention.query": "attention.attention.query", "attention.key": "attention.attention.key",
           "attention.value": "attention.attention.value"}
    linears = {**qkv, "attention.output": "attention.output.dense"}
    mlp = ("weights_in", "weights_out") if cfg.use_swiglu_ffn else ("fc1", "fc2")
    linears.update({f"mlp.{n}": f"mlp.{n}" for n in mlp})
    for ours, theirs in linears.items():
        out[f"layers.{ours}.kernel"] = stack(theirs + ".weight", linear)
        if cfg.qkv_bias or ours not in qkv:
            out[f"layers.{ours}.bias"] = stack(theirs + ".bias")
    for norm in ("norm1", "norm2"):
        out[f"layers.{norm}.scale"] = stack(norm + ".weight")
        out[f"layers.{norm}.bias"] = stack(norm + ".bias")
    out["layers.layer_scale1"] = stack("layer_scale1.lambda1")
    out["layers.layer_scale2"] = stack("layer_scale2.lambda1")
    out["layernorm.scale"] = take("layernorm.weight")
    out["layernorm.bias"] = take("layernorm.bias")
    src.check_all_used()
    return out
