"""Checkpoint conversion for the FLUX.1 DiT, and its loader.

Two on-disk layouts are supported:

* diffusers (``transformer/diffusion_pytorch_model*.safetensors`` + ``config.json``): separate
  ``to_q``/``to_k``/``to_v``, ``add_{q,k,v}_proj``, ``proj_mlp``; fused here.
* Black Forest Labs single file (``flux1-dev.safetensors``): already-fused ``qkv`` / ``linear1``;
  ``final_layer.adaLN_modulation.1`` is ordered ``(shift, scale)`` whereas our (diffusers)
  ``norm_out`` is ``(scale, shift)``, so its halves are swapped. Keys may carry the
  ``model.diffusion_model.`` prefix of full checkpoints.

Every tensor's shape is checked against the config before use, so a mismatch names the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.flux.config import FluxConfig
from vipo_jax.weights.loading import SourceKeys, linear
from vipo_jax.weights.safetensors_io import SafetensorsFile

Params = dict[str, np.ndarray]
_BFL_PREFIX = "model.diffusion_model."


class _Reader:
    """SourceKeys plus shape checks against the sizes the config implies."""

    def __init__(self, tensors: Mapping[str, np.ndarray] | SourceKeys, where: str, prefix: str = ""):
        self.sk = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)
        self.prefix = prefix

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + key
        if key not in self.sk:
            raise CheckpointError(f"missing key {key!r} in {self.sk.where}")
        got = self.sk.shape(key)
        if got != tuple(shape):
            raise CheckpointError(
                f"shape mismatch for {key!r} in {self.sk.where}: checkpoint has {got}, the config "
                f"implies {tuple(shape)}"
            )
        return self.sk.take(key)

    def dense(self, key: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        """torch Linear ``key`` (``.weight`` (out, in), ``.bias``) as (weight, bias), torch layout."""
        return self.get(f"{key}.weight", (n_out, n_in)), self.get(f"{key}.bias", (n_out,))

    def fused(self, keys: list[str], n_in: int, n_outs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Several torch Linears with the same input, concatenated along the output."""
        parts = [self.dense(k, n_in, n) for k, n in zip(keys, n_outs)]
        return (np.concatenate([w for w, _ in parts], axis=0),
                np.concatenate([b for _, b in parts], axis=0))

    def check_all_used(self) -> None:
        if self.prefix:
            self.sk.check_all_used(ignore=lambda k: not k.startswith(self.prefix))
        else:
            self.sk.check_all_used()


def _put(out: Params, name: str, wb: tuple[np.ndarray, np.ndarray]) -> None:
    w, b = wb
    out[f"{name}.kernel"] = linear(w)
    out[f"{name}.bias"] = np.asarray(b)


def _stack_layers(out: Params, prefix: str, n: int, layer: Callable[[int], Params]) -> None:
    if n == 0:
        return
    per = [layer(i) for i in range(n)]
    for name in per[0]:
        out[f"{prefix}.{name}"] = np.stack([p[name] for p in per])


def _where(tensors: Any, where: str | None) -> str:
    if where:
        return where
    if isinstance(tensors, SafetensorsFile):
        return str(tensors.path)
    return "FLUX checkpoint"


def convert_diffusers(tensors: Mapping[str, np.ndarray], cfg: FluxConfig, *, where: str | None = None) -> Params:
    """diffusers ``FluxTransformer2DModel`` state dict -> {nnx path: array}."""
    r = _Reader(tensors, _where(tensors, where))
    d, hd, mlp = cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_hidden_dim
    out: Params = {}
    _put(out, "x_embedder", r.dense("x_embedder", cfg.in_channels, d))
    _put(out, "context_embedder", r.dense("context_embedder", cfg.joint_attention_dim, d))
    embedders = [("timestep_embedder", cfg.timestep_channels), ("text_embedder", cfg.pooled_projection_dim)]
    if cfg.guidance_embeds:
        embedders.append(("guidance_embedder", cfg.timestep_channels))
    for name, n_in in embedders:
        p = f"time_text_embed.{name}"
        _put(out, f"{p}.linear_1", r.dense(f"{p}.linear_1", n_in, d))
        _put(out, f"{p}.linear_2", r.dense(f"{p}.linear_2", d, d))

    def double(i: int) -> Params:
        p = f"transformer_blocks.{i}."
        o: Params = {}
        _put(o, "img_mod", r.dense(p + "norm1.linear", d, 6 * d))
        _put(o, "txt_mod", r.dense(p + "norm1_context.linear", d, 6 * d))
        _put(o, "img_attn.qkv", r.fused([p + f"attn.to_{c}" for c in "qkv"], d, [d] * 3))
        _put(o, "txt_attn.qkv", r.fused([p + f"attn.add_{c}_proj" for c in "qkv"], d, [d] * 3))
        o["img_attn.norm_q.scale"] = r.get(p + "attn.norm_q.weight", (hd,))
        o["img_attn.norm_k.scale"] = r.get(p + "attn.norm_k.weight", (hd,))
        o["txt_attn.norm_q.scale"] = r.get(p + "attn.norm_added_q.weight", (hd,))
        o["txt_attn.norm_k.scale"] = r.get(p + "attn.norm_added_k.weight", (hd,))
        _put(o, "img_attn_out", r.dense(p + "attn.to_out.0", d, d))
        _put(o, "txt_attn_out", r.dense(p + "attn.to_add_out", d, d))
        for ours, theirs in (("img_mlp", "ff"), ("txt_mlp", "ff_context")):
            _put(o, f"{ours}.linear_in", r.dense(f"{p}{theirs}.net.0.proj", d, mlp))
            _put(o, f"{ours}.linear_out", r.dense(f"{p}{theirs}.net.2", mlp, d))
        return o

    def single(i: int) -> Params:
        p = f"single_transformer_blocks.{i}."
        o: Params = {}
        _put(o, "modulation", r.dense(p + "norm.linear", d, 3 * d))
        keys = [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"]
        _put(o, "linear1", r.fused(keys, d, [d, d, d, mlp]))
        _put(o, "linear2", r.dense(p + "proj_out", d + mlp, d))
        o["norm_q.scale"] = r.get(p + "attn.norm_q.weight", (hd,))
        o["norm_k.scale"] = r.get(p + "attn.norm_k.weight", (hd,))
        return o

    _stack_layers(out, "transformer_blocks", cfg.num_layers, double)
    _stack_layers(out, "single_transformer_blocks", cfg.num_single_layers, single)
    _put(out, "norm_out.linear", r.dense("norm_out.linear", d, 2 * d))
    _put(out, "proj_out", r.dense("proj_out", d, cfg.out_dim))
    r.check_all_used()
    return out


def _swap_halves(a: np.ndarray) -> np.ndarray:
    """(shift, scale) -> (scale, shift) along axis 0 (BFL final layer -> diffusers norm_out)."""
    shift, scale = np.split(np.asarray(a), 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def bfl_prefix(keys) -> str:
    """``"model.diffusion_model."`` when a BFL file carries it (full checkpoints), else ``""``."""
    return _BFL_PREFIX if any(k.startswith(_BFL_PREFIX) for k in keys) else ""


def is_bfl_layout(keys) -> bool:
    return any(("double_blocks." in k or "single_blocks." in k or k.endswith("img_in.weight")) for k in keys)


def bfl_has_guidance(keys) -> bool:
    return any(k.startswith(bfl_prefix(keys) + "guidance_in.") for k in keys)


def convert_bfl(tensors: Mapping[str, np.ndarray], cfg: FluxConfig, *, where: str | None = None) -> Params:
    """Black Forest Labs single-file state dict (``flux1-dev.safetensors``) -> {nnx path: array}."""
    r = _Reader(tensors, _where(tensors, where), prefix=bfl_prefix(tensors.keys()))
    d, hd, mlp = cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_hidden_dim
    out: Params = {}
    _put(out, "x_embedder", r.dense("img_in", cfg.in_channels, d))
    _put(out, "context_embedder", r.dense("txt_in", cfg.joint_attention_dim, d))
    embedders = [("timestep_embedder", "time_in", cfg.timestep_channels),
                 ("text_embedder", "vector_in", cfg.pooled_projection_dim)]
    if cfg.guidance_embeds:
        embedders.append(("guidance_embedder", "guidance_in", cfg.timestep_channels))
    for ours, theirs, n_in in embedders:
        _put(out, f"time_text_embed.{ours}.linear_1", r.dense(f"{theirs}.in_layer", n_in, d))
        _put(out, f"time_text_embed.{ours}.linear_2", r.dense(f"{theirs}.out_layer", d, d))

    def double(i: int) -> Params:
        p = f"double_blocks.{i}."
        o: Params = {}
        for s in ("img", "txt"):
            _put(o, f"{s}_mod", r.dense(f"{p}{s}_mod.lin", d, 6 * d))
            _put(o, f"{s}_attn.qkv", r.dense(f"{p}{s}_attn.qkv", d, 3 * d))
            o[f"{s}_attn.norm_q.scale"] = r.get(f"{p}{s}_attn.norm.query_norm.scale", (hd,))
            o[f"{s}_attn.norm_k.scale"] = r.get(f"{p}{s}_attn.norm.key_norm.scale", (hd,))
            _put(o, f"{s}_attn_out", r.dense(f"{p}{s}_attn.proj", d, d))
            _put(o, f"{s}_mlp.linear_in", r.dense(f"{p}{s}_mlp.0", d, mlp))
            _put(o, f"{s}_mlp.linear_out", r.dense(f"{p}{s}_mlp.2", mlp, d))
        return o

    def single(i: int) -> Params:
        p = f"single_blocks.{i}."
        o: Params = {}
        _put(o, "modulation", r.dense(p + "modulation.lin", d, 3 * d))
        _put(o, "linear1", r.dense(p + "linear1", d, 3 * d + mlp))
        _put(o, "linear2", r.dense(p + "linear2", d + mlp, d))
        o["norm_q.scale"] = r.get(p + "norm.query_norm.scale", (hd,))
        o["norm_k.scale"] = r.get(p + "norm.key_norm.scale", (hd,))
        return o

    _stack_layers(out, "transformer_blocks", cfg.num_layers, double)
    _stack_layers(out, "single_transformer_blocks", cfg.num_single_layers, single)
    w, b = r.dense("final_layer.adaLN_modulation.1", d, 2 * d)
    _put(out, "norm_out.linear", (_swap_halves(w), _swap_halves(b)))
    _put(out, "proj_out", r.dense("final_layer.linear", d, cfg.out_dim))
    r.check_all_used()
    return out
