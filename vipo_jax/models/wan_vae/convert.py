"""Checkpoint conversion and loading for the Wan2.1 video VAE (diffusers ``AutoencoderKLWan`` layout).

diffusers keys: ``encoder.down_blocks.<k>`` is one flat list (residual blocks, then a resampler
after each stage but the last, whose 2-d conv is ``resample.1`` and temporal conv ``time_conv``),
``{encoder,decoder}.mid_block.{resnets.0,attentions.0,resnets.1}``,
``decoder.up_blocks.<i>.{resnets.<j>,upsamplers.0}``, ``norm_out.gamma`` / ``conv_out``,
``quant_conv`` / ``post_quant_conv``. Norm gammas are stored as (C, 1, 1[, 1]) and the attention
projections as 1x1 Conv2d weights. The plan of ``(our module path, checkpoint prefix, kind)`` is
built from the config, so a checkpoint that does not match the config fails naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.wan_vae.config import WanVAEConfig
from vipo_jax.weights.loading import SourceKeys, conv

Plan = list[tuple[str, str, str]]  # (our module path, checkpoint module prefix, "conv"|"norm"|"proj")


def _resnet(plan: Plan, ours: str, theirs: str, cin: int, cout: int) -> None:
    for name, kind in (("norm1", "norm"), ("conv1", "conv"), ("norm2", "norm"), ("conv2", "conv")):
        plan.append((f"{ours}.{name}", f"{theirs}.{name}", kind))
    if cin != cout:
        plan.append((f"{ours}.conv_shortcut", f"{theirs}.conv_shortcut", "conv"))


def _mid(plan: Plan, part: str, c: int) -> None:
    for j in range(2):
        _resnet(plan, f"{part}.mid_block.resnets.{j}", f"{part}.mid_block.resnets.{j}", c, c)
    ours, theirs = f"{part}.mid_block.attention", f"{part}.mid_block.attentions.0"
    plan += [(f"{ours}.norm", f"{theirs}.norm", "norm"), (f"{ours}.to_qkv", f"{theirs}.to_qkv", "proj"),
             (f"{ours}.proj", f"{theirs}.proj", "proj")]


def plan_diffusers(cfg: WanVAEConfig) -> Plan:
    """Every module with parameters, in our naming and in diffusers'."""
    n = len(cfg.dim_mult)
    plan: Plan = [("encoder.conv_in", "encoder.conv_in", "conv")]
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    k = 0
    for i in range(n):
        cin, cout = dims[i], dims[i + 1]
        for _ in range(cfg.num_res_blocks):
            _resnet(plan, f"encoder.down_blocks.{k}", f"encoder.down_blocks.{k}", cin, cout)
            cin, k = cout, k + 1
        if i < n - 1:
            plan.append((f"encoder.down_blocks.{k}.resample", f"encoder.down_blocks.{k}.resample.1", "conv"))
            if cfg.temperal_downsample[i]:
                plan.append((f"encoder.down_blocks.{k}.time_conv", f"encoder.down_blocks.{k}.time_conv", "conv"))
            k += 1
    _mid(plan, "encoder", dims[-1])
    plan += [("encoder.norm_out", "encoder.norm_out", "norm"), ("encoder.conv_out", "encoder.conv_out", "conv"),
             ("quant_conv", "quant_conv", "conv"), ("post_quant_conv", "post_quant_conv", "conv"),
             ("decoder.conv_in", "decoder.conv_in", "conv")]

    mult = cfg.dim_mult
    dims = [cfg.decoder_dim * m for m in (mult[-1], *reversed(mult))]
    _mid(plan, "decoder", dims[0])
    for i in range(n):
        cin, cout = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
        for j in range(cfg.num_res_blocks + 1):
            _resnet(plan, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}", cin, cout)
            cin = cout
        if i < n - 1:
            ours, theirs = f"decoder.up_blocks.{i}.upsample", f"decoder.up_blocks.{i}.upsamplers.0"
            plan.append((f"{ours}.resample", f"{theirs}.resample.1", "conv"))
            if cfg.temporal_upsample[i]:
                plan.append((f"{ours}.time_conv", f"{theirs}.time_conv", "conv"))
    plan += [("decoder.norm_out", "decoder.norm_out", "norm"), ("decoder.conv_out", "decoder.conv_out", "conv")]
    return plan


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d / Conv3d (O, I, *k) -> (*k, I, O); other ranks are left for the shape check."""
    return conv(w) if w.ndim >= 3 else w


def _gamma(w: np.ndarray) -> np.ndarray:
    """(C, 1, 1[, 1]) -> (C,)."""
    return w.reshape(w.shape[0]) if w.ndim >= 1 and all(d == 1 for d in w.shape[1:]) else w


def _proj(w: np.ndarray) -> np.ndarray:
    """A 1x1 Conv2d weight (O, I, 1, 1) -> linear kernel (I, O)."""
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return w.reshape(w.shape[:2]).T
    return w


def _same(b: np.ndarray) -> np.ndarray:
    return b


_TRANSFORMS: dict[str, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    # our leaf -> (checkpoint leaf, transform)
    "conv": {"kernel": ("weight", _conv), "bias": ("bias", _same)},
    "norm": {"gamma": ("gamma", _gamma)},
    "proj": {"kernel": ("weight", _proj), "bias": ("bias", _same)},
}


def convert_diffusers(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: WanVAEConfig, *,
                      expected: Mapping[str, tuple[int, ...]] | None = None,
                      where: str = "checkpoint") -> dict[str, np.ndarray]:
    """diffusers ``AutoencoderKLWan`` state dict -> ``{dotted nnx path: array}``. ``expected`` (our
    path -> shape) turns shape mismatches into errors that name the checkpoint key; keys the
    config does not account for are errors too."""
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)
    out: dict[str, np.ndarray] = {}
    for ours, theirs, kind in plan_diffusers(cfg):
        for leaf, (their_leaf, fn) in _TRANSFORMS[kind].items():
            key, name = f"{theirs}.{their_leaf}", f"{ours}.{leaf}"
            value = fn(src.take(key))
            if expected is not None and name in expected and tuple(value.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"shape mismatch for {key!r} in {src.where}: checkpoint has {src.shape(key)} "
                    f"({tuple(value.shape)} in flax layout), the model's {name} expects "
                    f"{tuple(expected[name])}. Wrong config for this checkpoint?")
            out[name] = value
    src.check_all_used()
    return out
