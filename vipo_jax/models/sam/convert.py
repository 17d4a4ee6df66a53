"""transformers SAM checkpoints -> dotted nnx paths of :class:`SamVisionEncoder`.

Reads the ``vision_encoder.*`` keys of a full ``SamModel`` checkpoint (or of a ``SamVisionModel``,
which uses the same prefix; un-prefixed ``SamVisionEncoder`` state dicts work too). The prompt
encoder (``prompt_encoder.*``), the mask decoder (``mask_decoder.*``) and the shared positional
embedding (``shared_image_embedding.*``) of a ``SamModel`` are ignored explicitly; any other key the
encoder does not use is an error. Each block's fused ``attn.qkv`` projection is split into
``query`` / ``key`` / ``value`` (its output rows are ordered (3, heads, head_dim)). Blocks go to the
``windowed_layers`` or ``global_layers`` stack by ``global_attn_indexes``, in layer order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.sam.config import SamVisionConfig
from vipo_jax.weights.loading import SourceKeys, conv, linear

_PROBE = "patch_embed.projection.weight"
_PREFIXES = ("vision_encoder.", "")
# the rest of a SamModel: dropped on purpose when reading its image encoder
_OTHER_PARTS = ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")


def detect_prefix(keys) -> str:
    keys = set(keys)
    for p in _PREFIXES:
        if p + _PROBE in keys:
            return p
    raise CheckpointError(f"not a transformers SAM checkpoint: no 'vision_encoder.{_PROBE}' (or {_PROBE!r}) key")


def expected_shapes(cfg: SamVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers ``SamVisionEncoder`` for ``cfg`` (no prefix), with its shape."""
    d, c, p = cfg.hidden_size, cfg.output_channels, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.projection.weight": (d, cfg.num_channels, p, p),
        "patch_embed.projection.bias": (d,),
        "neck.conv1.weight": (c, d, 1, 1),
        "neck.conv2.weight": (c, c, 3, 3),
    }
    for n in ("neck.layer_norm1", "neck.layer_norm2"):
        shapes[f"{n}.weight"] = shapes[f"{n}.bias"] = (c,)
    if cfg.use_abs_pos:
        shapes["pos_embed"] = (1, cfg.grid, cfg.grid, d)
    for i in range(cfg.num_hidden_layers):
        pre = f"layers.{i}."
        shapes[pre + "attn.qkv.weight"] = (3 * d, d)
        if cfg.qkv_bias:
            shapes[pre + "attn.qkv.bias"] = (3 * d,)
        shapes[pre + "attn.proj.weight"] = (d, d)
        shapes[pre + "attn.proj.bias"] = (d,)
        if cfg.use_rel_pos:
            n = cfg.rel_pos_size(cfg.is_global(i))
            shapes[pre + "attn.rel_pos_h"] = shapes[pre + "attn.rel_pos_w"] = (n, cfg.head_dim)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{ln}.weight"] = shapes[f"{pre}{ln}.bias"] = (d,)
        shapes[pre + "mlp.lin1.weight"] = (cfg.mlp_dim, d)
        shapes[pre + "mlp.lin1.bias"] = (cfg.mlp_dim,)
        shapes[pre + "mlp.lin2.weight"] = (d, cfg.mlp_dim)
        shapes[pre + "mlp.lin2.bias"] = (d,)
    return shapes


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: SamVisionConfig) -> dict[str, np.ndarray]:
    """transformers SAM state dict -> ``{"dotted.nnx.path": array}`` of the image encoder. Missing
    keys, unexpected keys and shape mismatches raise :class:`CheckpointError` naming the key."""
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors)
    prefix = detect_prefix(src.keys())
    want = expected_shapes(cfg)
    d = cfg.hidden_size

    def take(key: str) -> np.ndarray:
        full = prefix + key
        if full in src and src.shape(full) != want[key]:
            raise CheckpointError(
                f"shape mismatch for {full!r} in {src.where}: checkpoint has {src.shape(full)}, "
                f"the config expects {want[key]} (wrong config.json?)"
            )
        return src.take(full)

    out: dict[str, np.ndarray] = {
        "patch_embed.kernel": conv(take("patch_embed.projection.weight")),
        "patch_embed.bias": take("patch_embed.projection.bias"),
        "neck.conv1.kernel": conv(take("neck.conv1.weight")),
        "neck.conv2.kernel": conv(take("neck.conv2.weight")),
    }
    for n in ("layer_norm1", "layer_norm2"):
        out[f"neck.{n}.scale"] = take(f"neck.{n}.weight")
        out[f"neck.{n}.bias"] = take(f"neck.{n}.bias")
    if cfg.use_abs_pos:
        out["pos_embed"] = take("pos_embed")

    def layer(i: int) -> dict[str, np.ndarray]:
        pre = f"layers.{i}."
        qkv = take(pre + "attn.qkv.weight")
        p: dict[str, np.ndarray] = {}
        for j, name in enumerate(("query", "key", "value")):
            p[f"attn.{name}.kernel"] = linear(qkv[j * d:(j + 1) * d])
        if cfg.qkv_bias:
            qkv_bias = take(pre + "attn.qkv.bias")
            for j, name in enumerate(("query", "key", "value")):
                p[f"attn.{name}.bias"] = qkv_bias[j * d:(j + 1) * d]
        p["attn.proj.kernel"] = linear(take(pre + "attn.proj.weight"))
        p["attn.proj.bias"] = take(pre + "attn.proj.bias")
        if cfg.use_rel_pos:
            p["attn.rel_pos_h"] = take(pre + "attn.rel_pos_h")
            p["attn.rel_pos_w"] = take(pre + "attn.rel_pos_w")
        for ln in ("layer_norm1", "layer_norm2"):
            p[f"{ln}.scale"] = take(f"{pre}{ln}.weight")
            p[f"{ln}.bias"] = take(f"{pre}{ln}.bias")
        for lin in ("mlp.lin1", "mlp.lin2"):
            p[f"{lin}.kernel"] = linear(take(f"{pre}{lin}.weight"))
            p[f"{lin}.bias"] = take(f"{pre}{lin}.bias")
        return p

    for stack, indexes in (("windowed_layers", cfg.windowed_indexes), ("global_layers", cfg.global_indexes)):
        if not indexes:
            continue
        per_layer = [layer(i) for i in indexes]
        for k in per_layer[0]:
            out[f"{stack}.{k}"] = np.stack([p[k] for p in per_layer])
    other = _OTHER_PARTS if prefix else ()
    src.check_all_used(ignore=lambda k: k.startswith(other) if other else False)
    return out
