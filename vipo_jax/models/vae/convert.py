"""Checkpoint conversion and loading for the KL autoencoder.

Two layouts are understood:

- ``diffusers``: a ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  keys such as ``encoder.down_blocks.0.resnets.0.norm1.weight``; the pre-0.14 attention names
  (``query`` / ``key`` / ``value`` / ``proj_attn``) are accepted too.
- ``bfl``: Black Forest Labs' ``ae.safetensors`` (the original LDM layout): ``encoder.down.0.block.0``,
  ``decoder.up.<n-1-i>`` for our up block ``i``, ``mid.block_1`` / ``mid.attn_1``, ``norm_out``,
  ``nin_shortcut``, and 1x1-conv attention projections.

Both are described by one plan of ``(our module path, checkpoint module prefix, kind)`` built from
the config, so a checkpoint that does not match the config fails with the offending key named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.vae.config import AutoencoderKLConfig
from vipo_jax.weights.loading import SourceKeys, conv, linear

Plan = list[tuple[str, str, str]]  # (our module path, checkpoint module prefix, "conv"|"norm"|"linear")


def _resnet(plan: Plan, ours: str, src: str, cin: int, cout: int, shortcut: str) -> None:
    plan += [(f"{ours}.norm1", f"{src}.norm1", "norm"), (f"{ours}.conv1", f"{src}.conv1", "conv"),
             (f"{ours}.norm2", f"{src}.norm2", "norm"), (f"{ours}.conv2", f"{src}.conv2", "conv")]
    if cin != cout:
        plan.append((f"{ours}.conv_shortcut", f"{src}.{shortcut}", "conv"))


def _plan(cfg: AutoencoderKLConfig, layout: str, attn_names: tuple[str, ...]) -> Plan:
    """Every module with parameters, in our naming and in the checkpoint's."""
    bfl = layout == "bfl"
    shortcut = "nin_shortcut" if bfl else "conv_shortcut"
    ch = cfg.block_out_channels
    n = len(ch)
    plan: Plan = []

    def mid(part: str) -> None:
        c = ch[-1]
        for j in range(2):
            src = f"{part}.mid.block_{j + 1}" if bfl else f"{part}.mid_block.resnets.{j}"
            _resnet(plan, f"{part}.mid_block.resnets.{j}", src, c, c, shortcut)
        if cfg.mid_block_add_attention:
            src = f"{part}.mid.attn_1" if bfl else f"{part}.mid_block.attentions.0"
            ours = f"{part}.mid_block.attention"
            plan.append((f"{ours}.group_norm", f"{src}.{'norm' if bfl else 'group_norm'}", "norm"))
            for mine, theirs in zip(("to_q", "to_k", "to_v", "to_out"), attn_names):
                plan.append((f"{ours}.{mine}", f"{src}.{theirs}", "linear"))

    def tail(part: str) -> None:
        plan.append((f"{part}.conv_norm_out", f"{part}.{'norm_out' if bfl else 'conv_norm_out'}", "norm"))
        plan.append((f"{part}.conv_out", f"{part}.conv_out", "conv"))

    plan.append(("encoder.conv_in", "encoder.conv_in", "conv"))
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            src = f"encoder.down.{i}.block.{j}" if bfl else f"encoder.down_blocks.{i}.resnets.{j}"
            _resnet(plan, f"encoder.down_blocks.{i}.resnets.{j}", src, cin if j == 0 else ch[i], ch[i],
                    shortcut)
        if i < n - 1:
            src = f"encoder.down.{i}.downsample" if bfl else f"encoder.down_blocks.{i}.downsamplers.0"
            src += ".conv"
            plan.append((f"encoder.down_blocks.{i}.downsample", src, "conv"))
    mid("encoder")
    tail("encoder")

    rch = tuple(reversed(ch))
    plan.append(("decoder.conv_in", "decoder.conv_in", "conv"))
    mid("decoder")
    for i in range(n):
        cin = rch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block + 1):
            src = f"decoder.up.{n - 1 - i}.block.{j}" if bfl else f"decoder.up_blocks.{i}.resnets.{j}"
            _resnet(plan, f"decoder.up_blocks.{i}.resnets.{j}", src, cin if j == 0 else rch[i], rch[i],
                    shortcut)
        if i < n - 1:
            src = f"decoder.up.{n - 1 - i}.upsample" if bfl else f"decoder.up_blocks.{i}.upsamplers.0"
            src += ".conv"
            plan.append((f"decoder.up_blocks.{i}.upsample", src, "conv"))
    tail("decoder")

    if cfg.use_quant_conv:
        plan.append(("quant_conv", "quant_conv", "conv"))
    if cfg.use_post_quant_conv:
        plan.append(("post_quant_conv", "post_quant_conv", "conv"))
    return plan


def _as_linear(w: np.ndarray, key: str, where: str) -> np.ndarray:
    """A Linear weight, or a 1x1 Conv1d / Conv2d weight used as one (LDM attention), -> (in, out)."""
    w = np.asarray(w)
    if w.ndim > 2:
        if any(d != 1 for d in w.shape[2:]):
            raise CheckpointError(f"{key} in {where}: expected a linear or 1x1 conv weight, got {w.shape}")
        w = w.reshape(w.shape[:2])
    return linear(w)


_TRANSFORMS: dict[str, dict[str, tuple[str, Callable[..., np.ndarray]]]] = {
    # our leaf -> (checkpoint leaf, transform(array, key, where))
    "conv": {"kernel": ("weight", lambda w, k, where: conv(w)), "bias": ("bias", lambda b, k, where: b)},
    "norm": {"scale": ("weight", lambda w, k, where: w), "bias": ("bias", lambda b, k, where: b)},
    "linear": {"kernel": ("weight", _as_linear), "bias": ("bias", lambda b, k, where: b)},
}


def _apply(plan: Plan, src: SourceKeys,
           expected: Mapping[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for ours, theirs, kind in plan:
        for leaf, (their_leaf, fn) in _TRANSFORMS[kind].items():
            key = f"{theirs}.{their_leaf}"
            name = f"{ours}.{leaf}"
            value = fn(src.take(key), key, src.where)
            if expected is not None and name in expected and tuple(value.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"shape mismatch for {key!r} in {src.where}: checkpoint has {src.shape(key)} "
                    f"({tuple(value.shape)} in flax layout), the model's {name} expects "
                    f"{tuple(expected[name])}. Wrong config for this checkpoint?"
                )
            out[name] = value
    src.check_all_used()
    return out


def _sources(tensors: Mapping[str, np.ndarray] | SourceKeys, where: str) -> SourceKeys:
    return tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)


def convert_diffusers(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: AutoencoderKLConfig, *,
                      expected: Mapping[str, tuple[int, ...]] | None = None,
                      where: str = "checkpoint") -> dict[str, np.ndarray]:
    """diffusers ``AutoencoderKL`` state dict -> ``{dotted nnx path: array}``. ``expected`` (our
    path -> shape) turns shape mismatches into errors that name the checkpoint key."""
    src = _sources(tensors, where)
    deprecated = "encoder.mid_block.attentions.0.query.weight" in src
    names = ("query", "key", "value", "proj_attn") if deprecated else ("to_q", "to_k", "to_v", "to_out.0")
    return _apply(_plan(cfg, "diffusers", names), src, expected)


class _StripPrefix(Mapping):
    """A view of ``tensors`` with ``prefix`` removed from the keys that have it."""

    def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, k: str) -> np.ndarray:
        return self.tensors[self.prefix + k]

    def __iter__(self):
        n = len(self.prefix)
        return (k[n:] if k.startswith(self.prefix) else k for k in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, k: str) -> tuple[int, ...]:
        if hasattr(self.tensors, "shape"):
            return tuple(self.tensors.shape(self.prefix + k))
        return tuple(np.shape(self.tensors[self.prefix + k]))


def convert_bfl_ae(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: AutoencoderKLConfig, *,
                   expected: Mapping[str, tuple[int, ...]] | None = None,
                   where: str = "checkpoint", prefix: str = "") -> dict[str, np.ndarray]:
    """BFL ``ae.safetensors`` / LDM first-stage state dict -> ``{dotted nnx path: array}``.
    ``prefix`` (e.g. ``"first_stage_model."``) is stripped from every key; keys without it are
    unexpected."""
    if prefix:
        tensors = _StripPrefix(tensors, prefix)
    src = _sources(tensors, where)
    return _apply(_plan(cfg, "bfl", ("q", "k", "v", "proj_out")), src, expected)


def detect_layout(keys) -> str:
    """``"bfl"`` for LDM-style keys (``encoder.down.0.block...``), else ``"diffusers"``."""
    for k in keys:
        if k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")):
            return "bfl"
    return "diffusers"
