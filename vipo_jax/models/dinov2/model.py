"""DINOv2 ViT (transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``) in Flax NNX.

Input pixels are NHWC ``(B, H, W, 3)``, already normalised (see :func:`preprocess`). The output is
the final-layernorm'd ``last_hidden_state`` ``(B, 1 + R + N, D)``: CLS, R register tokens, then the
``N = (H // 14) * (W // 14)`` patch tokens in row-major order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.dinov2.config import Dinov2Config
from vipo_jax.nn.activations import activation
from vipo_jax.nn.annotate import conv_init, linear_init, norm_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HIGHEST = jax.lax.Precision.HIGHEST
_TOKENS = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", "length", "act_mlp")


# --------------------------------------------------------------------------------------------
# Position-embedding interpolation, exactly as torch's F.interpolate(mode="bicubic",
# align_corners=False) with and without antialias. Both are separable, so each axis is one
# (out, in) weight matrix built with numpy from the static sizes.
# --------------------------------------------------------------------------------------------
def _cubic_conv1(x: np.ndarray, a: float) -> np.ndarray:  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_conv2(x: np.ndarray, a: float) -> np.ndarray:  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=128)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch's 1-D bicubic resampling (align_corners=False).

    Without antialias: cubic convolution with a = -0.75 at source ``scale * (i + 0.5) - 0.5``
    (scale = in / out), taps at floor - 1 .. floor + 2 clamped to the border.
    With antialias (torch's PIL-style path): Keys cubic with a = -0.5, widened by ``scale`` when
    downsampling, weights normalised over the taps inside the input (no border clamping)."""
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    i = np.arange(out_size, dtype=np.float64)
    if not antialias:
        if in_size == out_size:
            return np.eye(in_size)
        a = -0.75
        src = scale * (i + 0.5) - 0.5
        base = np.floor(src)
        t = src - base
        coeffs = (_cubic_conv2(t + 1, a), _cubic_conv1(t, a), _cubic_conv1(1 - t, a), _cubic_conv2(2 - t, a))
        for k, c in enumerate(coeffs):
            idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
            np.add.at(w, (np.arange(out_size), idx), c)
        return w
    a = -0.5
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for o in range(out_size):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.abs((np.arange(lo, hi) - center + 0.5) * inv)
        k = np.where(x < 1.0, _cubic_conv1(x, a), np.where(x < 2.0, _cubic_conv2(x, a), 0.0))
        total = k.sum()
        w[o, lo:hi] = k / total if total != 0 else k
    return w


def resize_bicubic_torch(x: jax.Array, size: Sequence[int], *, antialias: bool = False) -> jax.Array:
    """Resize ``x`` (..., H, W, C) to ``size`` = (h, w) like torch's
    ``F.interpolate(mode="bicubic", align_corners=False, antialias=antialias)`` on NCHW. Computed
    in float32, returned in ``x.dtype``."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    h, w = int(size[0]), int(size[1])
    wh = jnp.asarray(bicubic_matrix(h_in, h, antialias), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(w_in, w, antialias), jnp.float32)
    y = jnp.einsum("oh,...hwc->...owc", wh, x.astype(jnp.float32), precision=_HIGHEST)
    y = jnp.einsum("pw,...owc->...opc", ww, y, precision=_HIGHEST)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """LayerNorm in float32 whatever the compute dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def _layer_norm(cfg: Dinov2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **norm_init())


class Dinov2Embeddings(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.truncated_normal(0.02)
        self.patch_embeddings = nnx.Conv(cfg.num_channels, d, kernel_size=(cfg.patch_size, cfg.patch_size),
                                         strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                                         param_dtype=pd, dtype=jnp.dtype(cfg.dtype), rngs=rngs, **conv_init())
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), pd), out_sharding=(None, None, "embed"))
        if cfg.use_mask_token:
            # only used in masked pre-training; kept so that checkpoints load strictly
            self.mask_token = nnx.Param(jnp.zeros((1, d), pd), out_sharding=(None, "embed"))
        if cfg.num_register_tokens:
            self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_register_tokens, d), pd),
                                             out_sharding=(None, None, "embed"))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, cfg.num_positions + 1, d), pd),
                                             out_sharding=(None, None, "embed"))

    def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
        """(1, 1 + h * w, D) position embeddings for a patch grid, resized from the learned square
        grid as transformers does (bicubic in float32; antialiased in the with-registers model)."""
        pos = self.position_embeddings[...]
        n = self.cfg.position_grid
        if tuple(grid) == (n, n):
            return pos
        patch = pos[0, 1:].reshape(n, n, -1)
        patch = resize_bicubic_torch(patch.astype(jnp.float32), grid,
                                     antialias=self.cfg.num_register_tokens > 0).astype(pos.dtype)
        return jnp.concatenate([pos[:, :1], patch.reshape(1, grid[0] * grid[1], -1)], axis=1)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ValueError(f"Dinov2: expected pixels (B, H, W, {cfg.num_channels}), got {pixels.shape}")
        b, h, w, _ = pixels.shape
        grid = (h // cfg.patch_size, w // cfg.patch_size)
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"Dinov2: image {h}x{w} is smaller than one {cfg.patch_size}px patch")
        x = self.patch_embeddings(pixels.astype(dt)).reshape(b, grid[0] * grid[1], cfg.hidden_size)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(grid).astype(dt)
        if cfg.num_register_tokens:
            reg = jnp.broadcast_to(self.register_tokens[...].astype(dt),
                                   (b, cfg.num_register_tokens, cfg.hidden_size))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        return constrain(x, _TOKENS)


class Dinov2Attention(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd, dt = cfg.hidden_size, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        lin = functools.partial(nnx.Linear, d, d, param_dtype=pd, dtype=dt, rngs=rngs)
        self.query = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.key = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.value = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.output = lin(use_bias=True, **linear_init("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        shape = (b, n, self.cfg.num_attention_heads, self.cfg.head_dim)
        q, k, v = (constrain(p(x).reshape(shape), _HEADS) for p in (self.query, self.key, self.value))
        o = attention(q, k, v, implementation=self.cfg.attention)
        return self.output(o.reshape(b, n, self.cfg.hidden_size))


class Dinov2MLP(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.mlp_hidden, **kw, **linear_init("embed", "mlp"))
        self.fc2 = nnx.Linear(cfg.mlp_hidden, cfg.hidden_size, **kw, **linear_init("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(activation(self.hidden_act)(self.fc1(x)), _HIDDEN))


class Dinov2SwiGLU(nnx.Module):
    """DINOv2's fused SwiGLU: ``weights_in`` projects to [gate | up], ``silu(gate) * up``."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.weights_in = nnx.Linear(cfg.hidden_size, 2 * cfg.mlp_hidden, **kw, **linear_init("embed", "mlp"))
        self.weights_out = nnx.Linear(cfg.mlp_hidden, cfg.hidden_size, **kw, **linear_init("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(constrain(jax.nn.silu(gate) * up, _HIDDEN))


class Dinov2Layer(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.norm1 = _layer_norm(cfg, rngs)
        self.attention = Dinov2Attention(cfg, rngs=rngs)
        self.layer_scale1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, pd), out_sharding=("norm",))
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = Dinov2SwiGLU(cfg, rngs=rngs) if cfg.use_swiglu_ffn else Dinov2MLP(cfg, rngs=rngs)
        self.layer_scale2 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, pd), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, _TOKENS)
        x = x + self.attention(_norm(self.norm1, x)) * self.layer_scale1[...].astype(x.dtype)
        return constrain(x + self.mlp(_norm(self.norm2, x)) * self.layer_scale2[...].astype(x.dtype), _TOKENS)


class Dinov2Model(nnx.Module):
    """``Dinov2Model(cfg, rngs=nnx.Rngs(0))``; ``model(pixels) -> last_hidden_state``."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Dinov2Embeddings(cfg, rngs=rngs)
        self.layers = make_stack(lambda r: Dinov2Layer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
        self.layernorm = _layer_norm(cfg, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embeddings(pixels)
        x = scan_stack(self.layers, x, remat=self.config.remat)
        return _norm(self.layernorm, x)


def patch_tokens(model: Dinov2Model, pixels: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Normalised patch tokens as a grid ``(B, h, w, D)`` (CLS and registers dropped), and (h, w)."""
    cfg = model.config
    out = model(pixels)
    h, w = pixels.shape[1] // cfg.patch_size, pixels.shape[2] // cfg.patch_size
    tokens = out[:, 1 + cfg.num_register_tokens:]
    return tokens.reshape(out.shape[0], h, w, out.shape[-1]), (h, w)


def preprocess_size(size: int | Sequence[int], patch_size: int = 14) -> tuple[int, int]:
    """(h, w) rounded to the nearest multiple of ``patch_size`` (at least one patch)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2:
        raise ValueError(f"size must be an int or (h, w), got {size!r}")
    return tuple(max(patch_size, int(round(s / patch_size)) * patch_size) for s in hw)


def preprocess(images01: jax.Array, size: int | Sequence[int], *, patch_size: int = 14) -> jax.Array:
    """Images in [0, 1], NHWC -> resized (bilinear, antialiased) to ``size`` rounded to the patch
    size -> ImageNet mean / std normalisation. Float32 output, differentiable in ``images01``."""
    if images01.ndim != 4:
        raise ValueError(f"preprocess expects NHWC images, got shape {images01.shape}")
    h, w = preprocess_size(size, patch_size)
    x = images01.astype(jnp.float32)
    if (x.shape[1], x.shape[2]) != (h, w):
        x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="linear", antialias=True)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std
