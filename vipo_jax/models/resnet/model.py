"""ResNet (transformers ``ResNetModel``: microsoft/resnet-*) in Flax NNX, inference only.

Layout is NHWC: pixels ``(B, H, W, C)``, already normalised (see :func:`preprocess`); every feature
map is ``(B, h, w, D)``. The stem is a 7x7/2 convolution + BatchNorm + activation + 3x3/2 max-pool;
each stage is ``depths[i]`` basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with width / 4) residual
layers, the first of which may downsample (stride 2) and project its shortcut (1x1 conv +
BatchNorm).

BatchNorm is inference-only: the converter folds each norm's running statistics and affine
weights into one per-channel ``scale`` and ``bias`` (:class:`FrozenBatchNorm`), so the model holds
parameters only and no batch statistics are ever computed. The norms are applied in float32.

Module paths: ``embedder.{conv,norm}``, ``stages.<i>.first`` (the first layer of stage ``i``,
0-based) and ``stages.<i>.rest`` (its other ``depths[i] - 1`` identical layers, stacked with
:func:`vipo_jax.nn.stack.make_stack` and run with ``scan_stack``, under the config's ``remat``
policy); each layer has ``conv1``, ``conv2`` (``conv3`` for bottlenecks) and, where transformers has
one, ``shortcut``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.resnet.config import BOTTLENECK_REDUCTION, ResNetConfig
from vipo_jax.nn.activations import activation
from vipo_jax.nn.annotate import conv_init
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MAP = ("batch", None, None, "act_embed")


class FrozenBatchNorm(nnx.Module):
    """Inference BatchNorm folded into ``y = x * scale + bias`` (per channel, float32):
    ``scale = weight / sqrt(running_var + eps)``, ``bias = bias - running_mean * scale``."""

    def __init__(self, channels: int, cfg: ResNetConfig):
        pd = jnp.dtype(cfg.param_dtype)
        self.scale = nnx.Param(jnp.ones((channels,), pd), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), pd), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ConvNorm(nnx.Module):
    """transformers' ``ResNetConvLayer``: bias-free conv (padding ``kernel // 2``) + BatchNorm +
    optional activation."""

    def __init__(self, cin: int, cout: int, kernel: int, cfg: ResNetConfig, rngs: nnx.Rngs, *,
                 stride: int = 1, activation: str | None = "relu"):
        pad = kernel // 2
        self.conv = nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
                             padding=((pad, pad), (pad, pad)), use_bias=False, dtype=jnp.dtype(cfg.dtype),
                             param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **conv_init())
        self.norm = FrozenBatchNorm(cout, cfg)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.activation)(self.norm(self.conv(x)))


class ResNetLayer(nnx.Module):
    """One residual layer: transformers' ``ResNetBasicLayer`` (3x3 stride s, 3x3) or
    ``ResNetBottleNeckLayer`` (1x1, 3x3, 1x1; the stride on the first 1x1 when
    ``downsample_in_bottleneck``, else on the 3x3). The inner convolutions use ReLU, as
    transformers' do whatever ``hidden_act``; ``hidden_act`` follows the residual sum. The shortcut
    is a projection (1x1 conv stride s + BatchNorm) when the width or the resolution changes."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: ResNetConfig, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        if cfg.layer_type == "bottleneck":
            mid = cout // BOTTLENECK_REDUCTION
            s1, s2 = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
            self.conv1 = ConvNorm(cin, mid, 1, cfg, rngs, stride=s1)
            self.conv2 = ConvNorm(mid, mid, 3, cfg, rngs, stride=s2)
            self.conv3 = ConvNorm(mid, cout, 1, cfg, rngs, activation=None)
        else:
            self.conv1 = ConvNorm(cin, cout, 3, cfg, rngs, stride=stride)
            self.conv2 = ConvNorm(cout, cout, 3, cfg, rngs, activation=None)
            self.conv3 = None
        self.shortcut = (ConvNorm(cin, cout, 1, cfg, rngs, stride=stride, activation=None)
                         if cin != cout or stride != 1 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv2(self.conv1(x))
        if self.conv3 is not None:
            h = self.conv3(h)
        residual = self.shortcut(x) if self.shortcut is not None else x
        return constrain(activation(self.hidden_act)(h + residual), _MAP)


class ResNetStage(nnx.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int, cfg: ResNetConfig, rngs: nnx.Rngs):
        self.remat = cfg.remat
        self.first = ResNetLayer(cin, cout, stride, cfg, rngs)
        self.rest = (make_stack(lambda r: ResNetLayer(cout, cout, 1, cfg, r), depth - 1, rngs)
                     if depth > 1 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.first(x)
        if self.rest is not None:
            x = scan_stack(self.rest, x, remat=self.remat)
        return x


class ResNetModel(nnx.Module):
    """``ResNetModel(cfg, rngs=nnx.Rngs(0))``; ``model(pixels, stage="stage3") -> (B, h, w, D)``."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedder = ConvNorm(cfg.num_channels, cfg.embedding_size, 7, cfg, rngs, stride=2,
                                 activation=cfg.hidden_act)
        widths = (cfg.embedding_size,) + cfg.hidden_sizes
        self.stages = nnx.List([
            ResNetStage(widths[i], widths[i + 1], cfg.depths[i], cfg.stage_stride(i), cfg, rngs)
            for i in range(cfg.num_stages)
        ])

    def embed(self, pixels: jax.Array) -> jax.Array:
        """The stem: 7x7/2 conv + BatchNorm + activation, then a 3x3/2 max-pool (padding 1)."""
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ValueError(f"ResNet: expected pixels (B, H, W, {cfg.num_channels}), got {pixels.shape}")
        x = self.embedder(constrain(pixels.astype(jnp.dtype(cfg.dtype)), _MAP))
        x = jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        return constrain(x, _MAP)

    def hidden_states(self, pixels: jax.Array, stage: str | int | None = None) -> tuple[jax.Array, ...]:
        """The feature maps ``(stem, stage1, ...)`` up to and including ``stage`` (default: all),
        as transformers' ``output_hidden_states=True`` returns them (here NHWC)."""
        last = self.config.stage_index(stage)
        out = [self.embed(pixels)]
        for i in range(last):
            out.append(self.stages[i](out[-1]))
        return tuple(out)

    def __call__(self, pixels: jax.Array, stage: str | int | None = None) -> jax.Array:
        """The feature map ``(B, h, w, D)`` of ``stage`` (``"stem"``, ``"stage1"`` .. or an index
        into :attr:`ResNetConfig.stage_names`; default the last stage, transformers'
        ``last_hidden_state``). Later stages are not computed."""
        return self.hidden_states(pixels, stage)[-1]


def stage_features(model: ResNetModel, pixels: jax.Array, stage: str | int | None = None) -> jax.Array:
    """Feature map ``(B, h, w, D)`` of ``stage`` for normalised pixels ``(B, H, W, C)``; (h, w, D) is
    ``model.config.feature_grid((H, W), stage)``."""
    return model(pixels, stage)


def preprocess(images01: jax.Array, size: int | Sequence[int] | None = None) -> jax.Array:
    """Images in [0, 1], NHWC -> (optionally) resized to ``size`` = S or (h, w) (bilinear,
    antialiased) -> ImageNet mean / std normalisation. Float32 output, differentiable in ``images01``.

    transformers' processor for microsoft/resnet-* resizes the shortest side to 256 (bicubic, on
    uint8) and centre-crops 224; for PSM use the whole image is kept (no crop), so that the feature
    grid covers the generation; ResNet takes any input size."""
    if images01.ndim != 4:
        raise ValueError(f"preprocess expects NHWC images, got shape {images01.shape}")
    x = images01.astype(jnp.float32)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if (x.shape[1], x.shape[2]) != (h, w):
            x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="linear", antialias=True)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std
