"""transformers ResNet checkpoints (``ResNetModel``, ``ResNetBackbone`` and
``ResNetForImageClassification`` safetensors) -> dotted nnx paths of :class:`ResNetModel`.

Each BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``) is folded here, in float64,
into the ``scale`` / ``bias`` of a :class:`~vipo_jax.models.resnet.model.FrozenBatchNorm`; its
``num_batches_tracked`` counter (training bookkeeping) is consumed and dropped. The classification
head (``classifier.*``) of an ``ResNetForImageClassification`` checkpoint is dropped explicitly;
any other key the model does not use is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.resnet.config import BATCH_NORM_EPS, BOTTLENECK_REDUCTION, ResNetConfig
from vipo_jax.weights.loading import SourceKeys, conv

_PROBE = "embedder.embedder.convolution.weight"
# (model prefix, head prefix) of the checkpoint classes: ResNetModel / ResNetBackbone, then
# ResNetForImageClassification (base model under "resnet.", head "classifier.1.{weight,bias}")
_LAYOUTS = (("", None), ("resnet.", "classifier."))


def detect_prefix(keys) -> tuple[str, str | None]:
    """(prefix of the base model's keys, prefix of a classification head to drop or None)."""
    keys = set(keys)
    for prefix, head in _LAYOUTS:
        if prefix + _PROBE in keys:
            return prefix, head
    raise CheckpointError(f"not a transformers ResNet checkpoint: no {_PROBE!r} (or 'resnet.{_PROBE}') key")


def _layer_convs(cfg: ResNetConfig, cin: int, cout: int, stride: int) -> dict[str, tuple[int, int, int]]:
    """{transformers sub-module: (in, out, kernel)} of one residual layer, and ours by the same key."""
    if cfg.layer_type == "bottleneck":
        mid = cout // BOTTLENECK_REDUCTION
        convs = {"layer.0": (cin, mid, 1), "layer.1": (mid, mid, 3), "layer.2": (mid, cout, 1)}
    else:
        convs = {"layer.0": (cin, cout, 3), "layer.1": (cout, cout, 3)}
    if cin != cout or stride != 1:
        convs["shortcut"] = (cin, cout, 1)
    return convs


_OURS = {"layer.0": "conv1", "layer.1": "conv2", "layer.2": "conv3", "shortcut": "shortcut"}


def expected_shapes(cfg: ResNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers ``ResNetModel`` checkpoint for ``cfg`` (no prefix), with its
    shape; ``num_batches_tracked`` counters left out (they are optional)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(name: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{name}.convolution.weight"] = (cout, cin, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.normalization.{s}"] = (cout,)

    conv_norm("embedder.embedder", cfg.num_channels, cfg.embedding_size, 7)
    widths = (cfg.embedding_size,) + cfg.hidden_sizes
    for s in range(cfg.num_stages):
        for j in range(cfg.depths[s]):
            cin, stride = (widths[s], cfg.stage_stride(s)) if j == 0 else (widths[s + 1], 1)
            for sub, (i, o, k) in _layer_convs(cfg, cin, widths[s + 1], stride).items():
                conv_norm(f"encoder.stages.{s}.layers.{j}.{sub}", i, o, k)
    return shapes


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: ResNetConfig) -> dict[str, np.ndarray]:
    """transformers ResNet state dict -> ``{"dotted.nnx.path": array}``. Missing keys, unexpected
    keys and shape mismatches raise :class:`CheckpointError` naming the checkpoint key."""
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors)
    prefix, head = detect_prefix(src.keys())
    want = expected_shapes(cfg)

    def take(key: str) -> np.ndarray:
        full = prefix + key
        if full in src and src.shape(full) != want[key]:
            raise CheckpointError(
                f"shape mismatch for {full!r} in {src.where}: checkpoint has {src.shape(full)}, "
                f"the config expects {want[key]} (wrong config.json?)"
            )
        return src.take(full)

    def conv_norm(theirs: str) -> dict[str, np.ndarray]:
        """One transformers ResNetConvLayer / ResNetShortCut -> {conv.kernel, norm.scale, norm.bias}."""
        n = f"{theirs}.normalization."
        gamma, beta, mean, var = (take(n + s).astype(np.float64)
                                  for s in ("weight", "bias", "running_mean", "running_var"))
        if np.any(var < 0):
            raise CheckpointError(f"negative running variance in {prefix}{n}running_var of {src.where}")
        scale = gamma / np.sqrt(var + BATCH_NORM_EPS)
        counter = prefix + n + "num_batches_tracked"
        if counter in src:
            src.take(counter)  # training bookkeeping, unused at inference
        return {"conv.kernel": conv(take(f"{theirs}.convolution.weight")),
                "norm.scale": scale.astype(np.float32),
                "norm.bias": (beta - mean * scale).astype(np.float32)}

    out: dict[str, np.ndarray] = {f"embedder.{k}": v for k, v in conv_norm("embedder.embedder").items()}
    widths = (cfg.embedding_size,) + cfg.hidden_sizes
    for s in range(cfg.num_stages):
        layer = f"encoder.stages.{s}.layers."
        first = _layer_convs(cfg, widths[s], widths[s + 1], cfg.stage_stride(s))
        for sub in first:
            for k, v in conv_norm(f"{layer}0.{sub}").items():
                out[f"stages.{s}.first.{_OURS[sub]}.{k}"] = v
        rest = range(1, cfg.depths[s])
        if rest:
            for sub in _layer_convs(cfg, widths[s + 1], widths[s + 1], 1):
                per_layer = [conv_norm(f"{layer}{j}.{sub}") for j in rest]
                for k in per_layer[0]:
                    out[f"stages.{s}.rest.{_OURS[sub]}.{k}"] = np.stack([p[k] for p in per_layer])
    src.check_all_used(ignore=(lambda k: k.startswith(head)) if head else None)
    return out
