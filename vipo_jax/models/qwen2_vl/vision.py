"""The Qwen2-VL vision tower (transformers ``Qwen2VisionTransformerPretrainedModel``) in Flax NNX.

Input: flattened patches ``(B, N, C * tp * p * p)`` in the order Qwen2-VL's processor writes them
(per temporal patch: 2x2 merge blocks row-major, the 4 patches of a block row-major; each patch
flattened as (channel, frame, row, column)) and the static grid ``(t, h, w)`` of one video, the
same for every row of the batch. ``N = t * h * w``.

* ``patch_embed``: the reference's Conv3d with kernel = stride = (tp, p, p), written as the linear
  map over a flattened patch it is (``Linear(C * tp * p * p, embed_dim)``, no bias).
* 2-D RoPE on q / k: the first half of each head's rotary angles uses the patch row, the second
  half the column (``rope_theta`` 10000, ``head_dim / 2`` frequencies per axis pair).
* Blocks: pre-LayerNorm (eps 1e-6) attention with a fused ``qkv`` and an MLP (``hidden_act``,
  QuickGELU in the releases). Attention runs within one temporal patch (the reference's
  ``cu_seqlens`` splits the sequence into ``t`` chunks of ``h * w``): here each chunk is one batch
  row of the blocks.
* ``merger``: LayerNorm (eps 1e-6), 4 consecutive tokens concatenated, Linear -> GELU (exact) ->
  Linear to the text width.

Output: ``(B, t * h * w / 4, hidden_size)``, the video tokens in the order the LLM reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.models.qwen2_vl.config import Qwen2VLVisionConfig
from vipo_jax.nn.annotate import linear_init, norm_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import make_stack, scan_stack
from vipo_jax.sharding.rules import constrain

_TOKENS = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_HIDDEN = ("batch", "length", "act_mlp")

_ACT = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def check_grid(cfg: Qwen2VLVisionConfig, grid: Sequence[int]) -> tuple[int, int, int]:
    """Validate a static ``(t, h, w)`` patch grid (h and w multiples of the merge size)."""
    try:
        t, h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"Qwen2-VL vision: grid must be (t, h, w) ints, got {grid!r}") from None
    m = cfg.spatial_merge_size
    if min(t, h, w) < 1 or h % m or w % m:
        raise ValueError(f"Qwen2-VL vision: grid {(t, h, w)} must be positive with h and w multiples of "
                         f"spatial_merge_size {m}")
    return t, h, w


def patch_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(h * w, 2) (row, column) of each patch of one temporal slice, in the processor's order."""
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))

    def order(a: np.ndarray) -> np.ndarray:
        return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

    return np.stack([order(rows), order(cols)], axis=-1)


def vision_rope(cfg: Qwen2VLVisionConfig, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (cos, sin), each (h * w, head_dim): angles [row freqs | column freqs] repeated twice,
    as transformers' ``Qwen2VLVisionRotaryEmbedding`` (frequencies computed in float32)."""
    dim = cfg.head_dim // 2
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    pos = patch_positions(h, w, cfg.spatial_merge_size).astype(np.float32)  # (n, 2)
    freqs = (pos[:, :, None] * inv_freq.astype(np.float32)[None, None]).reshape(pos.shape[0], -1)  # (n, dim)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in float32; ``cos`` / ``sin`` broadcast against ``x`` (..., heads, head_dim)."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def _layer_norm(dim: int, cfg: Qwen2VLVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                         **norm_init())


def _norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd, dt = cfg.embed_dim, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.qkv = nnx.Linear(d, 3 * d, param_dtype=pd, dtype=dt, rngs=rngs, **linear_init("embed", "heads"))
        self.proj = nnx.Linear(d, d, param_dtype=pd, dtype=dt, rngs=rngs, **linear_init("heads", "embed"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads, hd = self.cfg.num_heads, self.cfg.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, heads, hd)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        q = constrain(apply_rope(qkv[:, :, 0], cos, sin), _HEADS)
        k = constrain(apply_rope(qkv[:, :, 1], cos, sin), _HEADS)
        v = constrain(qkv[:, :, 2], _HEADS)
        o = attention(q, k, v, implementation=self.cfg.attention)
        return self.proj(o.reshape(b, n, d))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.fc1 = nnx.Linear(cfg.embed_dim, cfg.mlp_hidden, **kw, **linear_init("embed", "mlp"))
        self.fc2 = nnx.Linear(cfg.mlp_hidden, cfg.embed_dim, **kw, **linear_init("mlp", "embed"))
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(_ACT[self.act](self.fc1(x)), _HIDDEN))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg.embed_dim, cfg, rngs)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg.embed_dim, cfg, rngs)
        self.mlp = VisionMlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = constrain(x, _TOKENS)
        x = x + self.attn(_norm(self.norm1, x), cos, sin)
        return constrain(x + self.mlp(_norm(self.norm2, x)), _TOKENS)


class PatchMerger(nnx.Module):
    """``ln_q`` then ``fc2(gelu(fc1(4 tokens concatenated)))`` (the reference's ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.ln_q = _layer_norm(cfg.embed_dim, cfg, rngs)
        self.fc1 = nnx.Linear(cfg.merged_dim, cfg.merged_dim, **kw, **linear_init(None, "mlp"))
        self.fc2 = nnx.Linear(cfg.merged_dim, cfg.hidden_size, **kw, **linear_init("mlp", "embed"))
        self.merged_dim = cfg.merged_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        x = _norm(self.ln_q, x).reshape(b, -1, self.merged_dim)
        return self.fc2(constrain(jax.nn.gelu(self.fc1(x), approximate=False), _HIDDEN))


class Qwen2VLVisionModel(nnx.Module):
    """``Qwen2VLVisionModel(cfg, rngs=nnx.Rngs(0))``; ``model(patches, grid) -> video tokens``."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.embed_dim, use_bias=False,
                                      param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                                      **linear_init(None, "embed"))
        self.blocks = make_stack(lambda r: VisionBlock(cfg, rngs=r), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(self, patches: jax.Array, grid: Sequence[int]) -> jax.Array:
        """``patches`` (B, t * h * w, patch_dim) -> (B, t * h * w / merge**2, hidden_size)."""
        cfg = self.config
        t, h, w = check_grid(cfg, grid)
        if patches.ndim != 3 or patches.shape[1:] != (t * h * w, cfg.patch_dim):
            raise ValueError(f"Qwen2-VL vision: expected patches (B, {t * h * w}, {cfg.patch_dim}) for grid "
                             f"{(t, h, w)}, got {patches.shape}")
        b = patches.shape[0]
        x = self.patch_embed(patches.astype(jnp.dtype(cfg.dtype)))
        # attention is per temporal patch: every slice of h * w tokens is one row of the blocks
        x = x.reshape(b * t, h * w, cfg.embed_dim)
        cos, sin = (jnp.asarray(a) for a in vision_rope(cfg, h, w))
        x = scan_stack(self.blocks, x, cos, sin, remat=cfg.remat)
        return self.merger(x.reshape(b, t * h * w, cfg.embed_dim))
