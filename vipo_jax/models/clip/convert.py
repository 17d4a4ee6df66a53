"""Checkpoint key layouts -> our nnx paths.

* ``convert_hf``: transformers safetensors of ``CLIPModel`` (``text_model.*``, ``vision_model.*``,
  ``text_projection``, ``visual_projection``, ``logit_scale``), ``CLIPTextModel`` (keys with the
  legacy ``text_model.`` prefix, e.g. FLUX's ``text_encoder/``, or without it as transformers v5
  saves them), ``CLIPTextModelWithProjection`` (its ``text_projection`` is dropped when loading a
  ``CLIPTextModel``) and ``CLIPVisionModel`` (``vision_model.`` prefix or none).
* ``convert_open_clip``: an open_clip ``CLIP`` state dict (``visual.*``, ``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks.N.*`` with fused ``in_proj`` q/k/v,
  ``ln_final``, ``text_projection`` and ``visual.proj`` as (in, out) matrices, ``logit_scale``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.clip.config import (
    OPEN_CLIP_CONFIGS,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    config_from_open_clip,
)
from vipo_jax.models.clip.model import CLIPModel
from vipo_jax.weights.loading import SourceKeys, abstract_model, abstract_params, conv, linear
from vipo_jax.weights.safetensors_io import save_safetensors
from vipo_jax.weights.torch_pickle import load_torch_state_dict

Params = dict[str, np.ndarray]

_HF_LAYER = {  # ours -> transformers, under encoder.layers.N.
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _src(tensors, where: str) -> SourceKeys:
    return tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)


def _norm(src: SourceKeys, out: Params, ours: str, theirs: str) -> None:
    out[f"{ours}.scale"] = src.take(f"{theirs}.weight")
    out[f"{ours}.bias"] = src.take(f"{theirs}.bias")


def _stacked_norm(src: SourceKeys, out: Params, ours: str, theirs: list[str]) -> None:
    out[f"{ours}.scale"] = src.stack(f"{t}.weight" for t in theirs)
    out[f"{ours}.bias"] = src.stack(f"{t}.bias" for t in theirs)


def _hf_layers(src: SourceKeys, out: Params, ours: str, theirs: str, n: int) -> None:
    blocks = [f"{theirs}encoder.layers.{i}." for i in range(n)]
    for o, t in _HF_LAYER.items():
        out[f"{ours}layers.{o}.kernel"] = src.stack((f"{b}{t}.weight" for b in blocks), linear)
        out[f"{ours}layers.{o}.bias"] = src.stack(f"{b}{t}.bias" for b in blocks)
    for ln in ("layer_norm1", "layer_norm2"):
        _stacked_norm(src, out, f"{ours}layers.{ln}", [f"{b}{ln}" for b in blocks])


def _prefix(src: SourceKeys, probe: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if p + probe in src:
            return p
    raise CheckpointError(f"missing key {prefixes[0] + probe!r} in {src.where} (not a transformers "
                          "CLIP checkpoint of the expected kind)")


def _hf_text(src: SourceKeys, cfg: CLIPTextConfig, ours: str, theirs: str) -> Params:
    out: Params = {}
    out[f"{ours}token_embedding.embedding"] = src.take(f"{theirs}embeddings.token_embedding.weight")
    out[f"{ours}position_embedding"] = src.take(f"{theirs}embeddings.position_embedding.weight")
    _hf_layers(src, out, ours, theirs, cfg.num_hidden_layers)
    _norm(src, out, f"{ours}final_layer_norm", f"{theirs}final_layer_norm")
    return out


def _hf_vision(src: SourceKeys, cfg: CLIPVisionConfig, ours: str, theirs: str) -> Params:
    out: Params = {}
    out[f"{ours}patch_embedding.kernel"] = conv(src.take(f"{theirs}embeddings.patch_embedding.weight"))
    out[f"{ours}class_embedding"] = src.take(f"{theirs}embeddings.class_embedding")
    out[f"{ours}position_embedding"] = src.take(f"{theirs}embeddings.position_embedding.weight")
    _norm(src, out, f"{ours}pre_layrnorm", f"{theirs}pre_layrnorm")
    _hf_layers(src, out, ours, theirs, cfg.num_hidden_layers)
    _norm(src, out, f"{ours}post_layernorm", f"{theirs}post_layernorm")
    return out


def _scalar(src: SourceKeys, key: str) -> np.ndarray:
    v = src.take(key)
    if v.size != 1:
        raise CheckpointError(f"shape mismatch for {key} in {src.where}: {v.shape}, expected a scalar")
    return v.reshape(())


def _is_buffer(key: str) -> bool:
    # Non-persistent buffers that older transformers versions wrote into checkpoints.
    return key.endswith("embeddings.position_ids")


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys,
               cfg: CLIPConfig | CLIPTextConfig | CLIPVisionConfig, where: str = "checkpoint") -> Params:
    """A transformers CLIP checkpoint -> params of ``CLIPModel`` / ``CLIPTextModel`` /
    ``CLIPVisionModel``, chosen by the type of ``cfg``. Unexpected keys raise CheckpointError."""
    src = _src(tensors, where)
    ignore = _is_buffer
    if isinstance(cfg, CLIPConfig):
        out = _hf_text(src, cfg.text_config, "text_model.", "text_model.")
        out.update(_hf_vision(src, cfg.vision_config, "vision_model.", "vision_model."))
        out["text_projection.kernel"] = linear(src.take("text_projection.weight"))
        out["visual_projection.kernel"] = linear(src.take("visual_projection.weight"))
        out["logit_scale"] = _scalar(src, "logit_scale")
    elif isinstance(cfg, CLIPTextConfig):
        theirs = _prefix(src, "embeddings.token_embedding.weight", ("text_model.", ""))
        out = _hf_text(src, cfg, "", theirs)
        # CLIPTextModelWithProjection: CLIPTextModel has no projection, drop it.
        ignore = lambda k: _is_buffer(k) or k == "text_projection.weight"
    elif isinstance(cfg, CLIPVisionConfig):
        theirs = _prefix(src, "embeddings.patch_embedding.weight", ("vision_model.", ""))
        out = _hf_vision(src, cfg, "", theirs)
    else:
        raise TypeError(f"convert_hf: unsupported config type {type(cfg).__name__}")
    src.check_all_used(ignore)
    return out


def _oc_layers(src: SourceKeys, out: Params, ours: str, theirs: str, n: int, d: int) -> None:
    blocks = [f"{theirs}transformer.resblocks.{i}." for i in range(n)]
    w = src.stack(f"{b}attn.in_proj_weight" for b in blocks)  # (n, 3d, d), rows q | k | v
    bias = src.stack(f"{b}attn.in_proj_bias" for b in blocks)  # (n, 3d)
    if w.shape[1:] != (3 * d, d) or bias.shape[1:] != (3 * d,):
        raise CheckpointError(f"shape mismatch for {blocks[0]}attn.in_proj_weight in {src.where}: "
                              f"{w.shape[1:]} / {bias.shape[1:]}, config expects ({3 * d}, {d}) / ({3 * d},)")
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{ours}layers.self_attn.{name}.kernel"] = np.swapaxes(w[:, j * d:(j + 1) * d], 1, 2)
        out[f"{ours}layers.self_attn.{name}.bias"] = bias[:, j * d:(j + 1) * d]
    for o, t in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        out[f"{ours}layers.{o}.kernel"] = src.stack((f"{b}{t}.weight" for b in blocks), linear)
        out[f"{ours}layers.{o}.bias"] = src.stack(f"{b}{t}.bias" for b in blocks)
    _stacked_norm(src, out, f"{ours}layers.layer_norm1", [f"{b}ln_1" for b in blocks])
    _stacked_norm(src, out, f"{ours}layers.layer_norm2", [f"{b}ln_2" for b in blocks])


# Non-weight entries some open_clip / OpenAI state dicts carry.
_OC_IGNORE = frozenset({"attn_mask", "input_resolution", "context_length", "vocab_size"})


def convert_open_clip(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: CLIPConfig,
                      where: str = "checkpoint") -> Params:
    """An open_clip ``CLIP`` state dict (e.g. HPSv2.1's ViT-H-14) -> ``CLIPModel`` params."""
    src = _src(tensors, where)
    tc, vc = cfg.text_config, cfg.vision_config
    out: Params = {}
    # vision tower
    out["vision_model.patch_embedding.kernel"] = conv(src.take("visual.conv1.weight"))
    out["vision_model.class_embedding"] = src.take("visual.class_embedding")
    out["vision_model.position_embedding"] = src.take("visual.positional_embedding")
    _norm(src, out, "vision_model.pre_layrnorm", "visual.ln_pre")
    _oc_layers(src, out, "vision_model.", "visual.", vc.num_hidden_layers, vc.hidden_size)
    _norm(src, out, "vision_model.post_layernorm", "visual.ln_post")
    out["visual_projection.kernel"] = src.take("visual.proj")  # already (width, embed_dim)
    # text tower
    out["text_model.token_embedding.embedding"] = src.take("token_embedding.weight")
    out["text_model.position_embedding"] = src.take("positional_embedding")
    _oc_layers(src, out, "text_model.", "", tc.num_hidden_layers, tc.hidden_size)
    _norm(src, out, "text_model.final_layer_norm", "ln_final")
    out["text_projection.kernel"] = src.take("text_projection")  # already (width, embed_dim)
    out["logit_scale"] = _scalar(src, "logit_scale")
    src.check_all_used(lambda k: k in _OC_IGNORE)
    return out


def detect_layout(keys) -> str:
    """"open_clip" or "hf" from a checkpoint's key names."""
    keys = set(keys)
    if "visual.conv1.weight" in keys or "token_embedding.weight" in keys:
        return "open_clip"
    return "hf"


def _open_clip_model_cfg(model: str | None, config: str | Path | Mapping | None) -> dict[str, Any]:
    if config is not None:
        if isinstance(config, Mapping):
            return dict(config)
        try:
            return json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable open_clip model config {config}: {e}") from e
    model = model or "ViT-H-14"
    if model not in OPEN_CLIP_CONFIGS:
        raise CheckpointError(f"unknown open_clip model {model!r}: known {sorted(OPEN_CLIP_CONFIGS)}; "
                              "pass --config with the model's open_clip json")
    return OPEN_CLIP_CONFIGS[model]


def convert_open_clip_checkpoint(src: str | Path, dst: str | Path, *, model: str | None = None,
                                 config: str | Path | Mapping | None = None) -> Path:
    """Convert an open_clip ``.pt`` (e.g. HPS_v2.1_compressed.pt) to ``dst`` (.safetensors) plus
    ``dst.with_suffix(".json")`` (our CLIPConfig). ``model``: a name in
    ``vipo_jax.models.clip.OPEN_CLIP_CONFIGS``; ``config``: an open_clip model config (dict or
    json path). Returns the path of the written config."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"--dst must end in .safetensors, got {dst}")
    cfg = config_from_open_clip(_open_clip_model_cfg(model, config))
    tensors = load_torch_state_dict(src)
    # Validate before writing: every key used, every shape right.
    params = convert_open_clip(tensors, cfg, where=str(src))
    want = abstract_params(abstract_model(CLIPModel, cfg))
    for name, spec in want.items():
        if tuple(np.shape(params[name])) != tuple(spec.shape):
            raise CheckpointError(f"shape mismatch for {name} from {src}: checkpoint has "
                                  f"{tuple(np.shape(params[name]))}, config expects {tuple(spec.shape)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(dst, tensors, metadata={"format": "open_clip", "source": src.name})
    cfg_path = dst.with_suffix(".json")
    cfg_path.write_text(json.dumps({**cfg.to_dict(), "layout": "open_clip"}, indent=2) + "\n")
    return cfg_path
