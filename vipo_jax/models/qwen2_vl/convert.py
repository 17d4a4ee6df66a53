"""transformers Qwen2-VL checkpoints -> dotted nnx paths of :class:`Qwen2VLModel`.

Two key layouts are read: the released one (transformers 4.4x, and what transformers 5's
``save_pretrained`` still writes): ``visual.*``, ``model.embed_tokens`` / ``model.layers.N.*`` /
``model.norm``, ``lm_head``; and transformers 5's in-memory names: ``model.visual.*``,
``model.language_model.*``, ``lm_head``. ``lm_head.weight`` (tied to the embeddings in the 2B
release, so often absent) is accepted and dropped: this port has no LM head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.qwen2_vl.config import Qwen2VLConfig
from vipo_jax.weights.loading import SourceKeys, linear

# (vision prefix, text prefix) of each layout
LAYOUTS = {"released": ("visual.", "model."), "transformers5": ("model.visual.", "model.language_model.")}

# our path inside a stacked block -> the reference's name, for Linear layers (kernel + bias)
_VISION_LINEARS = {"attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TEXT_LINEARS = {"self_attn.q_proj": True, "self_attn.k_proj": True, "self_attn.v_proj": True,
                 "self_attn.o_proj": False, "mlp.gate_proj": False, "mlp.up_proj": False, "mlp.down_proj": False}


def detect_layout(keys: Iterable[str]) -> str:
    keys = set(keys)
    if any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys):
        return "transformers5"
    if any(k.startswith("visual.") for k in keys) or any(k.startswith("model.layers.") for k in keys):
        return "released"
    raise CheckpointError(f"not a Qwen2-VL checkpoint: no visual.* / model.layers.* keys (first keys: "
                          f"{sorted(keys)[:5]})")


def expected_shapes(cfg: Qwen2VLConfig, layout: str = "released") -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2-VL checkpoint for ``cfg`` must hold (``lm_head`` excluded), with its shape."""
    v, t = cfg.vision_config, cfg.text_config
    vp, tp = LAYOUTS[layout]
    d, hd = v.embed_dim, t.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        vp + "patch_embed.proj.weight": (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        vp + "merger.ln_q.weight": (d,), vp + "merger.ln_q.bias": (d,),
        vp + "merger.mlp.0.weight": (v.merged_dim, v.merged_dim), vp + "merger.mlp.0.bias": (v.merged_dim,),
        vp + "merger.mlp.2.weight": (v.hidden_size, v.merged_dim), vp + "merger.mlp.2.bias": (v.hidden_size,),
        tp + "embed_tokens.weight": (t.vocab_size, t.hidden_size),
        tp + "norm.weight": (t.hidden_size,),
    }
    vision_lin = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (v.mlp_hidden, d),
                  "mlp.fc2": (d, v.mlp_hidden)}
    for i in range(v.depth):
        pre = f"{vp}blocks.{i}."
        for name, (o, n) in vision_lin.items():
            shapes[pre + name + ".weight"] = (o, n)
            shapes[pre + name + ".bias"] = (o,)
        for norm in ("norm1", "norm2"):
            shapes[pre + norm + ".weight"] = (d,)
            shapes[pre + norm + ".bias"] = (d,)
    qo, kvo = t.num_attention_heads * hd, t.num_key_value_heads * hd
    text_lin = {"self_attn.q_proj": (qo, t.hidden_size), "self_attn.k_proj": (kvo, t.hidden_size),
                "self_attn.v_proj": (kvo, t.hidden_size), "self_attn.o_proj": (t.hidden_size, qo),
                "mlp.gate_proj": (t.intermediate_size, t.hidden_size),
                "mlp.up_proj": (t.intermediate_size, t.hidden_size),
                "mlp.down_proj": (t.hidden_size, t.intermediate_size)}
    for i in range(t.num_hidden_layers):
        pre = f"{tp}layers.{i}."
        for name, (o, n) in text_lin.items():
            shapes[pre + name + ".weight"] = (o, n)
            if _TEXT_LINEARS[name]:
                shapes[pre + name + ".bias"] = (o,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[pre + norm + ".weight"] = (t.hidden_size,)
    return shapes


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: Qwen2VLConfig,
               where: str = "checkpoint") -> dict[str, np.ndarray]:
    """transformers Qwen2-VL state dict -> ``{"dotted.nnx.path": array}``. Missing keys, unexpected
    keys and shape mismatches raise :class:`CheckpointError` naming the checkpoint key."""
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where=where)
    layout = detect_layout(src.keys())
    vp, tp = LAYOUTS[layout]
    want = expected_shapes(cfg, layout)
    v, t = cfg.vision_config, cfg.text_config

    def take(key: str) -> np.ndarray:
        if key in src and src.shape(key) != want[key]:
            hint = " (wrong config.json, or a vocabulary resized after training?)" if "embed_tokens" in key else \
                " (wrong config.json?)"
            raise CheckpointError(f"shape mismatch for {key!r} in {src.where}: checkpoint has {src.shape(key)}, "
                                  f"the config expects {want[key]}{hint}")
        return src.take(key)

    def stack(prefix: str, n: int, suffix: str, fn=None) -> np.ndarray:
        arrays = [take(f"{prefix}{i}.{suffix}") for i in range(n)]
        return np.stack([fn(a) for a in arrays] if fn else arrays)

    out: dict[str, np.ndarray] = {}
    w = take(vp + "patch_embed.proj.weight")
    out["visual.patch_embed.kernel"] = linear(w.reshape(w.shape[0], -1))
    blocks = vp + "blocks."
    for ours, theirs in _VISION_LINEARS.items():
        out[f"visual.blocks.{ours}.kernel"] = stack(blocks, v.depth, theirs + ".weight", linear)
        out[f"visual.blocks.{ours}.bias"] = stack(blocks, v.depth, theirs + ".bias")
    for norm in ("norm1", "norm2"):
        out[f"visual.blocks.{norm}.scale"] = stack(blocks, v.depth, norm + ".weight")
        out[f"visual.blocks.{norm}.bias"] = stack(blocks, v.depth, norm + ".bias")
    out["visual.merger.ln_q.scale"] = take(vp + "merger.ln_q.weight")
    out["visual.merger.ln_q.bias"] = take(vp + "merger.ln_q.bias")
    for ours, theirs in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
        out[f"visual.merger.{ours}.kernel"] = linear(take(f"{vp}merger.{theirs}.weight"))
        out[f"visual.merger.{ours}.bias"] = take(f"{vp}merger.{theirs}.bias")

    out["language_model.embed_tokens.embedding"] = take(tp + "embed_tokens.weight")
    layers = tp + "layers."
    for name, bias in _TEXT_LINEARS.items():
        out[f"language_model.layers.{name}.kernel"] = stack(layers, t.num_hidden_layers, name + ".weight", linear)
        if bias:
            out[f"language_model.layers.{name}.bias"] = stack(layers, t.num_hidden_layers, name + ".bias")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"language_model.layers.{norm}.weight"] = stack(layers, t.num_hidden_layers, norm + ".weight")
    out["language_model.norm.weight"] = take(tp + "norm.weight")
    if "lm_head.weight" in src:
        shape = src.shape("lm_head.weight")
        if shape != (t.vocab_size, t.hidden_size):
            raise CheckpointError(f"shape mismatch for 'lm_head.weight' in {src.where}: checkpoint has {shape}, "
                                  f"the config expects {(t.vocab_size, t.hidden_size)}")
        src.used.add("lm_head.weight")  # read but not loaded: no LM head in this port
    src.check_all_used()
    return out
