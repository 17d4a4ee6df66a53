"""SAM's ViT image encoder (transformers ``SamModel.vision_encoder`` / ``SamVisionEncoder``) in
Flax NNX, inference only.

Pixels are NHWC ``(B, S, S, 3)`` with ``S = image_size`` (1024), already normalised and padded
(see :func:`preprocess`). A 16 px patch embedding and an absolute position table give a
``(B, 64, 64, D)`` token grid; each block is pre-norm attention + MLP, where the attention is
either windowed (the grid zero-padded to a multiple of ``window_size`` and cut into windows; the
padding tokens are attended to, as in SAM) or global (layers ``global_attn_indexes``), with
decomposed relative position biases (``rel_pos_h`` / ``rel_pos_w``, MViTv2). The neck (1x1 conv,
channel LayerNorm, 3x3 conv, channel LayerNorm) maps the tokens to the ``(B, 64, 64, 256)`` image
embeddings.

Layer stacking: the windowed and the global layers differ in the shape of their relative position
tables (2 x 14 - 1 vs 2 x 64 - 1 rows), so they are two stacks, ``windowed_layers`` and
``global_layers`` (``make_stack``, leading ``"layers"`` axis, in layer order within each). They are
run in the order of the config as runs of consecutive same-kind layers, each run a ``scan_stack``
over a slice of its stack; when the run pattern repeats (every released SAM: ViT-B is
(2 windowed, 1 global) x 4), one outer scan over the repeats runs a single copy of the pattern, so
the compiled program holds one windowed and one global layer body whatever the depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.sam.config import NECK_LAYER_NORM_EPS, SamVisionConfig
from vipo_jax.nn.activations import activation
from vipo_jax.nn.annotate import conv_init, linear_init, norm_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GRID = ("batch", None, None, "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", None, None, "act_mlp")


def _norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """LayerNorm over the last (channel) axis in float32 whatever the compute dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def _layer_norm(width: int, eps: float, cfg: SamVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                         rngs=rngs, **norm_init())


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nh * nw, window, window, C) windows (row-major per image), after
    zero-padding H and W at the end to multiples of ``window``; also returns the padded (H, W)."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`: back to (B, H, W, C) with the padding cut off."""
    hp, wp = padded
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, : size[0], : size[1]]


def _relative_index(n: int) -> np.ndarray:
    """(n, n) rows of a (2n - 1)-row relative table: query i, key j -> i - j + n - 1."""
    i = np.arange(n)
    return i[:, None] - i[None, :] + (n - 1)


def relative_position_bias(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Decomposed relative position bias (MViTv2, as SAM's ``get_decomposed_rel_pos``) for queries
    ``q`` (B, h * w, heads, d) on an (h, w) grid attending to the same grid: bias[b, head, (qy, qx),
    (ky, kx)] = q . rel_h[qy - ky + h - 1] + q . rel_w[qx - kx + w - 1]. Computed in float32;
    returns (B, heads, h * w, h * w). The tables must have 2h - 1 and 2w - 1 rows (transformers
    would interpolate other sizes; this encoder never produces them)."""
    h, w = size
    if rel_h.shape[0] != 2 * h - 1 or rel_w.shape[0] != 2 * w - 1:
        raise ValueError(f"SAM: relative position tables of {rel_h.shape[0]} / {rel_w.shape[0]} rows do not fit a "
                         f"{h}x{w} attention grid (needs {2 * h - 1} / {2 * w - 1})")
    b, _, heads, d = q.shape
    rh = rel_h.astype(jnp.float32)[_relative_index(h)]  # (h, kh, d)
    rw = rel_w.astype(jnp.float32)[_relative_index(w)]  # (w, kw, d)
    q = q.astype(jnp.float32).reshape(b, h, w, heads, d)
    hi = jax.lax.Precision.HIGHEST
    bias_h = jnp.einsum("byxnd,ykd->bnyxk", q, rh, precision=hi)  # (B, heads, h, w, kh)
    bias_w = jnp.einsum("byxnd,xkd->bnyxk", q, rw, precision=hi)  # (B, heads, h, w, kw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(b, heads, h * w, h * w)


class SamVisionAttention(nnx.Module):
    """Multi-head self-attention over an (h, w) grid with decomposed relative position biases.
    transformers' fused ``qkv`` projection is split into ``query`` / ``key`` / ``value`` at
    conversion; ``proj`` is the output projection."""

    def __init__(self, cfg: SamVisionConfig, is_global: bool, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd, dt = cfg.hidden_size, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        lin = functools.partial(nnx.Linear, d, d, param_dtype=pd, dtype=dt, rngs=rngs)
        self.query = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.key = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.value = lin(use_bias=cfg.qkv_bias, **linear_init("embed", "heads"))
        self.proj = lin(use_bias=True, **linear_init("heads", "embed"))
        if cfg.use_rel_pos:
            n = cfg.rel_pos_size(is_global)
            self.rel_pos_h = nnx.Param(jnp.zeros((n, cfg.head_dim), pd), out_sharding=(None, None))
            self.rel_pos_w = nnx.Param(jnp.zeros((n, cfg.head_dim), pd), out_sharding=(None, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, h, w, _ = x.shape
        shape = (b, h * w, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (constrain(p(x).reshape(shape), _HEADS) for p in (self.query, self.key, self.value))
        bias = (relative_position_bias(q, self.rel_pos_h[...], self.rel_pos_w[...], (h, w))
                if cfg.use_rel_pos else None)
        o = attention(q, k, v, bias=bias, implementation=cfg.attention)
        return self.proj(o.reshape(b, h, w, cfg.hidden_size))


class SamMLP(nnx.Module):
    def __init__(self, cfg: SamVisionConfig, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.lin1 = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **kw, **linear_init("embed", "mlp"))
        self.lin2 = nnx.Linear(cfg.mlp_dim, cfg.hidden_size, **kw, **linear_init("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(constrain(activation(self.hidden_act)(self.lin1(x)), _HIDDEN))


class SamVisionLayer(nnx.Module):
    """Pre-norm block on the (B, h, w, D) grid; ``is_global`` picks global or windowed attention."""

    def __init__(self, cfg: SamVisionConfig, is_global: bool, *, rngs: nnx.Rngs):
        self.window = 0 if is_global else cfg.window_size
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg, rngs)
        self.attn = SamVisionAttention(cfg, is_global, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg, rngs)
        self.mlp = SamMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, _GRID)
        h = _norm(self.layer_norm1, x)
        if self.window:
            windows, padded = window_partition(h, self.window)
            h = window_unpartition(self.attn(windows), self.window, padded, x.shape[1:3])
        else:
            h = self.attn(h)
        x = x + h
        return constrain(x + self.mlp(_norm(self.layer_norm2, x)), _GRID)


class SamVisionNeck(nnx.Module):
    """1x1 conv -> channel LayerNorm -> 3x3 conv (padding 1) -> channel LayerNorm; no conv biases."""

    def __init__(self, cfg: SamVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        c = cfg.output_channels
        self.conv1 = nnx.Conv(cfg.hidden_size, c, kernel_size=(1, 1), padding="VALID", **kw, **conv_init())
        self.layer_norm1 = _layer_norm(c, NECK_LAYER_NORM_EPS, cfg, rngs)
        self.conv2 = nnx.Conv(c, c, kernel_size=(3, 3), padding=((1, 1), (1, 1)), **kw, **conv_init())
        self.layer_norm2 = _layer_norm(c, NECK_LAYER_NORM_EPS, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _norm(self.layer_norm1, self.conv1(x))
        return _norm(self.layer_norm2, self.conv2(x))


# --------------------------------------------------------------------------------------------
# Running the two stacks in layer order
# --------------------------------------------------------------------------------------------
def _map_stack(stack: nnx.Module | None, fn) -> nnx.Module | None:
    """The same stack with ``fn`` applied to every (stacked) parameter array."""
    if stack is None:
        return None
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(fn, state))


def _repeating_unit(runs: tuple[tuple[bool, int], ...]) -> tuple[tuple[tuple[bool, int], ...], int]:
    """The shortest run pattern that ``runs`` repeats, and how many times."""
    n = len(runs)
    for size in range(1, n + 1):
        if n % size == 0 and runs == runs[:size] * (n // size):
            return runs[:size], n // size
    return runs, 1


class _LayerRuns(nnx.Module):
    """One pass over ``runs`` (is_global, count): each run is a ``scan_stack`` over the next
    ``count`` layers of its stack. Built at call time around the model's stacks (or their
    per-repeat reshapes), so that an outer ``scan_stack`` can loop over repeats of the pattern."""

    def __init__(self, windowed: nnx.Module | None, global_: nnx.Module | None,
                 runs: tuple[tuple[bool, int], ...], remat: str):
        self.windowed = windowed
        self.global_layers = global_
        self.runs = runs
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        offset = {False: 0, True: 0}
        for is_global, count in self.runs:
            stack = self.global_layers if is_global else self.windowed
            start = offset[is_global]
            offset[is_global] += count
            total = jax.tree.leaves(nnx.state(stack))[0].shape[0]
            if (start, count) != (0, total):
                stack = _map_stack(stack, lambda a, s=start, c=count: a[s:s + c])
            x = scan_stack(stack, x, remat=self.remat)
        return x


class SamVisionEncoder(nnx.Module):
    """``SamVisionEncoder(cfg, rngs=nnx.Rngs(0))``; ``model(pixels) -> (B, h, w, output_channels)``
    image embeddings (``neck=False``: the ViT tokens ``(B, h, w, hidden_size)`` before the neck)."""

    def __init__(self, cfg: SamVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.patch_embed = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=(cfg.patch_size,) * 2,
                                    strides=(cfg.patch_size,) * 2, padding="VALID", param_dtype=pd,
                                    dtype=jnp.dtype(cfg.dtype), rngs=rngs, **conv_init())
        if cfg.use_abs_pos:
            self.pos_embed = nnx.Param(jnp.zeros((1, cfg.grid, cfg.grid, cfg.hidden_size), pd),
                                       out_sharding=(None, None, None, "embed"))
        nw, ng = len(cfg.windowed_indexes), len(cfg.global_indexes)
        self.windowed_layers = (make_stack(lambda r: SamVisionLayer(cfg, False, rngs=r), nw, rngs)
                                if nw else None)
        self.global_layers = make_stack(lambda r: SamVisionLayer(cfg, True, rngs=r), ng, rngs) if ng else None
        self.neck = SamVisionNeck(cfg, rngs=rngs)

    def embed(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"SAM: expected pixels (B, {want[0]}, {want[1]}, {want[2]}), got {pixels.shape} "
                             "(resize and pad with vipo_jax.models.sam.preprocess)")
        x = self.patch_embed(pixels.astype(jnp.dtype(cfg.dtype)))
        if cfg.use_abs_pos:
            x = x + self.pos_embed[...].astype(x.dtype)
        return constrain(x, _GRID)

    def encode(self, pixels: jax.Array) -> jax.Array:
        """The ViT tokens after the last block, (B, h, w, hidden_size) (the neck's input)."""
        x = self.embed(pixels)
        unit, repeats = _repeating_unit(self.config.layer_runs)
        remat = self.config.remat
        if repeats == 1:
            return _LayerRuns(self.windowed_layers, self.global_layers, unit, remat)(x)

        def per_repeat(a):
            return a.reshape(repeats, a.shape[0] // repeats, *a.shape[1:])

        group = _LayerRuns(_map_stack(self.windowed_layers, per_repeat), _map_stack(self.global_layers, per_repeat),
                           unit, remat)
        return scan_stack(group, x)

    def __call__(self, pixels: jax.Array, *, neck: bool = True) -> jax.Array:
        x = self.encode(pixels)
        return self.neck(x) if neck else x


def image_embeddings(model: SamVisionEncoder, pixels: jax.Array, *, neck: bool = True) -> jax.Array:
    """SAM features ``(B, h, w, D)`` of preprocessed pixels ``(B, S, S, 3)``: the neck's image
    embeddings (D = output_channels, 256; transformers' ``get_image_embeddings`` in NHWC), or with
    ``neck=False`` the last ViT block's tokens (D = hidden_size). (h, w) = S / patch_size."""
    return model(pixels, neck=neck)


def preprocess_size(height: int, width: int, image_size: int = 1024) -> tuple[int, int]:
    """SAM's resize target: the longest side to ``image_size``, the other scaled and rounded
    (``int(x * scale + 0.5)``, as transformers' ``SamImageProcessor``)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(images01: jax.Array, image_size: int = 1024) -> jax.Array:
    """Images in [0, 1], NHWC -> SAM's input ``(B, image_size, image_size, 3)``: the longest side
    resized to ``image_size`` (bilinear, antialiased; a square generation is simply resized to
    ``image_size x image_size``), ImageNet mean / std normalisation, then zero padding at the bottom
    / right to a square (zeros after normalisation, as the reference processor pads). Float32,
    differentiable in ``images01``.

    Differences from transformers' ``SamImageProcessor``: it works on uint8 (a rounding of the input
    to 1/255 steps) and resizes with PIL's bilinear filter; here everything stays in float (the
    antialiased bilinear filter is the same kind, no quantisation). For a non-square input the
    features of the padded area (rows / columns beyond ``preprocess_size(...) / patch_size``) see
    padding only and should be cropped by the caller."""
    if images01.ndim != 4:
        raise ValueError(f"preprocess expects NHWC images, got shape {images01.shape}")
    b, h, w, c = images01.shape
    nh, nw = preprocess_size(h, w, image_size)
    x = images01.astype(jnp.float32)
    if (h, w) != (nh, nw):
        x = jax.image.resize(x, (b, nh, nw, c), method="linear", antialias=True)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = (x - mean) / std
    if (nh, nw) != (image_size, image_size):
        x = jnp.pad(x, ((0, 0), (0, image_size - nh), (0, image_size - nw), (0, 0)))
    return x

