"""The ImageReward checkpoint layout -> our nnx paths, strictly.

``ImageReward.pt`` is the ``state_dict()`` of ``ImageReward.ImageReward``:

* ``blip.visual_encoder.*``: BLIP's timm-style ViT (``patch_embed.proj``, ``cls_token`` (1, 1, D),
  ``pos_embed`` (1, 1 + patches, D), ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}``, ``norm``), with the fused ``qkv`` rows ordered q | k | v;
* ``blip.text_encoder.*``: med.py's ``BertModel`` without pooler (``embeddings.{word_embeddings,
  position_embeddings, LayerNorm}``, ``encoder.layer.N.{attention, crossattention}.{self.{query,
  key, value}, output.{dense, LayerNorm}}``, ``intermediate.dense``, ``output.{dense, LayerNorm}``);
* ``mlp.layers.{0, 2, 4, 6, 7}``: the head's Linear layers (1, 3, 5 are dropouts).

Ignored: ``blip.vision_proj`` / ``blip.text_proj`` (BLIP_Pretrain's contrastive projections, which
scoring never uses) and the ``embeddings.position_ids`` buffer. Anything else is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.blip.config import BlipTextConfig, BlipVisionConfig, ImageRewardConfig
from vipo_jax.models.blip.model import ImageRewardModel
from vipo_jax.weights.loading import SourceKeys, abstract_model, abstract_params, conv, linear
from vipo_jax.weights.safetensors_io import save_safetensors
from vipo_jax.weights.torch_pickle import load_torch_state_dict

Params = dict[str, np.ndarray]

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
_IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


def _src(tensors, where: str) -> SourceKeys:
    return tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)


def _linear(src: SourceKeys, out: Params, ours: str, blocks: list[str], theirs: str) -> None:
    out[f"{ours}.kernel"] = src.stack((f"{b}{theirs}.weight" for b in blocks), linear)
    out[f"{ours}.bias"] = src.stack(f"{b}{theirs}.bias" for b in blocks)


def _norm(src: SourceKeys, out: Params, ours: str, blocks: list[str], theirs: str) -> None:
    out[f"{ours}.scale"] = src.stack(f"{b}{theirs}.weight" for b in blocks)
    out[f"{ours}.bias"] = src.stack(f"{b}{theirs}.bias" for b in blocks)


def _squeeze(src: SourceKeys, key: str, ndim: int) -> np.ndarray:
    """Drop the leading singleton axes of ``cls_token`` / ``pos_embed`` (1, ..., D)."""
    v = src.take(key)
    lead = v.shape[:v.ndim - ndim]
    if v.ndim < ndim or any(s != 1 for s in lead):
        raise CheckpointError(f"shape mismatch for {key} in {src.where}: {v.shape}, expected (1, ...) with "
                              f"{ndim} trailing axes")
    return v.reshape(v.shape[v.ndim - ndim:])


def convert_blip_vision(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: BlipVisionConfig,
                        prefix: str = VISION_PREFIX, ours: str = "", where: str = "checkpoint") -> Params:
    """BLIP ViT keys under ``prefix`` -> :class:`BlipVisionModel` params under ``ours``."""
    src = _src(tensors, where)
    d = cfg.hidden_size
    out: Params = {}
    out[f"{ours}patch_embed.kernel"] = conv(src.take(f"{prefix}patch_embed.proj.weight"))
    out[f"{ours}patch_embed.bias"] = src.take(f"{prefix}patch_embed.proj.bias")
    out[f"{ours}cls_token"] = _squeeze(src, f"{prefix}cls_token", 1)
    out[f"{ours}pos_embed"] = _squeeze(src, f"{prefix}pos_embed", 2)
    blocks = [f"{prefix}blocks.{i}." for i in range(cfg.num_hidden_layers)]
    w = src.stack(f"{b}attn.qkv.weight" for b in blocks)  # (n, 3d, d)
    bias = src.stack(f"{b}attn.qkv.bias" for b in blocks)  # (n, 3d)
    if w.shape[1:] != (3 * d, d) or bias.shape[1:] != (3 * d,):
        raise CheckpointError(f"shape mismatch for {blocks[0]}attn.qkv.weight in {src.where}: {w.shape[1:]} / "
                              f"{bias.shape[1:]}, config expects ({3 * d}, {d}) / ({3 * d},)")
    for j, name in enumerate(("q", "k", "v")):
        out[f"{ours}blocks.attn.{name}.kernel"] = np.swapaxes(w[:, j * d:(j + 1) * d], 1, 2)
        out[f"{ours}blocks.attn.{name}.bias"] = bias[:, j * d:(j + 1) * d]
    _linear(src, out, f"{ours}blocks.attn.proj", blocks, "attn.proj")
    _linear(src, out, f"{ours}blocks.mlp.fc1", blocks, "mlp.fc1")
    _linear(src, out, f"{ours}blocks.mlp.fc2", blocks, "mlp.fc2")
    _norm(src, out, f"{ours}blocks.norm1", blocks, "norm1")
    _norm(src, out, f"{ours}blocks.norm2", blocks, "norm2")
    out[f"{ours}norm.scale"] = src.take(f"{prefix}norm.weight")
    out[f"{ours}norm.bias"] = src.take(f"{prefix}norm.bias")
    return out


def _attention(src: SourceKeys, out: Params, ours: str, blocks: list[str], theirs: str) -> None:
    for name in ("query", "key", "value"):
        _linear(src, out, f"{ours}.{name}", blocks, f"{theirs}.self.{name}")
    _linear(src, out, f"{ours}.dense", blocks, f"{theirs}.output.dense")
    _norm(src, out, f"{ours}.norm", blocks, f"{theirs}.output.LayerNorm")


def convert_blip_text(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: BlipTextConfig,
                      prefix: str = TEXT_PREFIX, ours: str = "", where: str = "checkpoint") -> Params:
    """med.py ``BertModel`` keys under ``prefix`` -> :class:`BlipTextModel` params under ``ours``."""
    src = _src(tensors, where)
    out: Params = {}
    out[f"{ours}word_embeddings.embedding"] = src.take(f"{prefix}embeddings.word_embeddings.weight")
    out[f"{ours}position_embeddings"] = src.take(f"{prefix}embeddings.position_embeddings.weight")
    out[f"{ours}embed_norm.scale"] = src.take(f"{prefix}embeddings.LayerNorm.weight")
    out[f"{ours}embed_norm.bias"] = src.take(f"{prefix}embeddings.LayerNorm.bias")
    blocks = [f"{prefix}encoder.layer.{i}." for i in range(cfg.num_hidden_layers)]
    _attention(src, out, f"{ours}layers.attention", blocks, "attention")
    if cfg.add_cross_attention:
        _attention(src, out, f"{ours}layers.crossattention", blocks, "crossattention")
    _linear(src, out, f"{ours}layers.intermediate", blocks, "intermediate.dense")
    _linear(src, out, f"{ours}layers.output", blocks, "output.dense")
    _norm(src, out, f"{ours}layers.output_norm", blocks, "output.LayerNorm")
    return out


def head_source_indices(cfg: ImageRewardConfig) -> list[int]:
    """``mlp.layers`` indices of the head's Linear layers: a Dropout follows each of the first
    three (0, 2, 4), none the last two (6, 7), as in ImageReward's ``MLP``."""
    idx, i = [], 0
    n = len(cfg.mlp_hidden_sizes) + 1
    for j in range(n):
        idx.append(i)
        i += 2 if j < n - 2 else 1
    return idx


def is_ignored(key: str) -> bool:
    """Entries of ``ImageReward.pt`` that scoring does not use."""
    return key.startswith(_IGNORED_PREFIXES) or key.endswith("embeddings.position_ids")


def check_image_reward_keys(keys, where: str) -> None:
    """Refuse a checkpoint that is not ImageReward's, before looking for individual keys."""
    keys = set(keys)
    probes = (f"{VISION_PREFIX}cls_token", f"{TEXT_PREFIX}embeddings.word_embeddings.weight", "mlp.layers.0.weight")
    missing = [p for p in probes if p not in keys]
    if missing:
        hint = ""
        if "visual_encoder.cls_token" in keys:
            hint = " (this looks like a BLIP checkpoint without ImageReward's blip. prefix and reward head)"
        elif "visual.conv1.weight" in keys or "text_model.embeddings.token_embedding.weight" in keys:
            hint = " (this looks like a CLIP checkpoint)"
        raise CheckpointError(f"{where} is not an ImageReward checkpoint: no {missing}{hint}")


def convert_image_reward(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: ImageRewardConfig,
                         where: str = "checkpoint") -> Params:
    """An ``ImageReward.pt`` state dict (or its safetensors copy) -> :class:`ImageRewardModel` params.
    Missing keys, unexpected keys and qkv / token shape errors raise CheckpointError."""
    src = _src(tensors, where)
    check_image_reward_keys(src.keys(), src.where)
    out = convert_blip_vision(src, cfg.vision_config, ours="visual_encoder.")
    out.update(convert_blip_text(src, cfg.text_config, ours="text_encoder."))
    for i, j in enumerate(head_source_indices(cfg)):
        out[f"head.{i}.kernel"] = linear(src.take(f"mlp.layers.{j}.weight"))
        out[f"head.{i}.bias"] = src.take(f"mlp.layers.{j}.bias")
    src.check_all_used(is_ignored)
    return out


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable config {path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d


def resolve_config(config: ImageRewardConfig | Mapping | str | os.PathLike | None = None,
                   med_config: Mapping | str | os.PathLike | None = None) -> ImageRewardConfig:
    """The ImageReward-v1.0 architecture unless ``config`` (our config.json, a dict, or a config)
    says otherwise; ``med_config`` (BLIP's ``med_config.json``) replaces the text encoder's fields."""
    if isinstance(config, ImageRewardConfig):
        cfg = config
    elif config is None:
        cfg = ImageRewardConfig()
    else:
        cfg = ImageRewardConfig.from_dict(config if isinstance(config, Mapping) else _read_json(config))
    if med_config is not None:
        med = med_config if isinstance(med_config, Mapping) else _read_json(med_config)
        cfg = cfg.replace(text_config=BlipTextConfig.from_dict(med))
    return cfg


def convert_image_reward_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                                    config: ImageRewardConfig | Mapping | str | os.PathLike | None = None,
                                    med_config: Mapping | str | os.PathLike | None = None) -> Path:
    """``ImageReward.pt`` -> ``out_dir/model.safetensors`` (the used tensors, ImageReward's key names
    and dtypes unchanged) + ``out_dir/config.json`` (our :class:`ImageRewardConfig`). Every key and
    shape is checked before anything is written. Needs torch (to read the pickle). Returns
    ``out_dir``; :func:`vipo_jax.models.blip.from_pretrained` loads it."""


    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output {out_dir} exists and is not a folder")
    cfg = resolve_config(config, med_config)
    tensors = load_torch_state_dict(src)
    check_image_reward_keys(tensors.keys(), str(src))
    params = convert_image_reward(tensors, cfg, where=str(src))
    want = abstract_params(abstract_model(ImageRewardModel, cfg))
    for name, spec in want.items():
        if tuple(np.shape(params[name])) != tuple(spec.shape):
            raise CheckpointError(f"shape mismatch for {name} from {src}: checkpoint has "
                                  f"{tuple(np.shape(params[name]))}, config expects {tuple(spec.shape)}")
    kept = {k: v for k, v in tensors.items() if not is_ignored(k)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / "model.safetensors", kept, metadata={"format": "image_reward", "source": src.name})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out_dir
