"""The Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) in Flax NNX, channels-last.

Videos are ``(B, F, H, W, C)`` in [-1, 1] with ``F = 1 + 4k``; latents are
``(B, 1 + k, H/8, W/8, z_dim)``. Every 3x3x3 convolution is causal in time: it sees the two
previous frames (zeros before the clip starts), never later ones.

Like the reference, the clip is processed in chunks (the decoder: the first latent frame, then one
latent frame at a time; the encoder: the first frame, then 4 frames at a time), with each causal
layer's last input frames carried from one chunk to the next. The chunks after the first run in a
``jax.lax.scan`` with those context frames as carry, so memory and compile time do not grow with
the clip length. The chunking is part of the model, not only a memory trick: the temporal
resamplers treat the first chunk specially (its frame passes through without temporal
convolution), which is what Wan checkpoints were trained with.

Module names follow diffusers (``decoder.up_blocks.1.resnets.0.conv1``) with the one-element
``mid_block.attentions.0`` / ``up_blocks.i.upsamplers.0`` lists flattened to ``attention`` /
``upsample`` and the resamplers' ``resample.1`` conv named ``resample``. RMS norms and the
attention softmax run in float32 whatever the compute dtype; ``encode`` / ``decode`` return float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.wan_vae.config import ENCODER_CHUNK, WanVAEConfig
from vipo_jax.nn.attention import attention

_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp
_NORM_EPS = 1e-12  # torch.nn.functional.normalize
UNROLL_CHUNKS = 4  # clips of at most this many chunks after the first are not scanned (see _run_chunks)
CONTEXT = 2  # past frames a 3-tap causal convolution needs (diffusers' CACHE_T)


class ChunkCache:
    """The causal context of one chunk: each temporal layer, in call order, reads the frames the
    previous chunk left for it and leaves its own for the next. ``previous=None`` is the first
    chunk, whose context is zeros (the clip's causal padding)."""

    def __init__(self, previous: Sequence[jax.Array] | None = None):
        self.first = previous is None
        self._previous = None if previous is None else iter(previous)
        self.new: list[jax.Array] = []

    def _read(self, x: jax.Array, n: int) -> jax.Array:
        if self._previous is None:
            return jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
        try:
            ctx = next(self._previous)
        except StopIteration:
            raise RuntimeError("ChunkCache: more temporal layers than cached contexts") from None
        return ctx.astype(x.dtype)

    def extend(self, x: jax.Array, n: int) -> jax.Array:
        """``x`` with its ``n`` past frames prepended; keeps the last ``n`` frames for the next chunk."""
        xc = jnp.concatenate([self._read(x, n), x], axis=1)
        self.new.append(xc[:, -n:])
        return xc

    def reset(self, like: jax.Array, n: int) -> None:
        """Consume this layer's context and leave ``n`` zero frames for the next chunk instead."""
        self._read(like, n)
        self.new.append(jnp.zeros((like.shape[0], n, *like.shape[2:]), like.dtype))

    def done(self) -> tuple[jax.Array, ...]:
        if self._previous is not None and next(self._previous, None) is not None:
            raise RuntimeError("ChunkCache: cached contexts left unused")
        return tuple(self.new)


def _dtypes(cfg: WanVAEConfig) -> tuple[jnp.dtype, jnp.dtype]:
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


class Conv(nnx.Module):
    """An N-d convolution (2-d or 3-d, channels-last) with explicit padding; kernel (*k, in, out)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], cfg: WanVAEConfig, rngs: nnx.Rngs, *,
                 strides: tuple[int, ...] | None = None, padding: tuple[tuple[int, int], ...] | None = None):
        nd = len(kernel)
        pdtype, self.dtype = _dtypes(cfg)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout), pdtype),
                                out_sharding=(None,) * nd + ("conv_in", "conv_out"))
        self.bias = nnx.Param(jnp.zeros((cout,), pdtype), out_sharding=("conv_out",))
        self.strides = tuple(strides or (1,) * nd)
        self.padding = tuple(padding or ((0, 0),) * nd)
        spatial = "DHW"[3 - nd:]  # nd is 2 or 3
        self.dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if w.ndim == 5 and jax.default_backend() == "cpu" and self.padding[0] == (0, 0):
            y = _conv3d_as_2d(x, w, self.strides, self.padding[1:])
        else:
            y = jax.lax.conv_general_dilated(x, w, self.strides, self.padding,
                                             dimension_numbers=self.dimension_numbers)
        return y + self.bias[...].astype(self.dtype)


def _conv3d_as_2d(x: jax.Array, w: jax.Array, strides: tuple[int, ...],
                  padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """A 3-d convolution (no time padding) as one 2-d convolution over every output frame's ``kt``
    input frames stacked along channels: the same sums, and on CPU about ten times faster than
    XLA's 3-d convolution (forward and gradient), which is what makes the video toy world trainable
    on two cores. ``x`` (B, T, H, W, C), ``w`` (kt, kh, kw, C, O)."""
    kt, kh, kw, c, o = w.shape
    st = strides[0]
    b, t = x.shape[:2]
    t_out = (t - kt) // st + 1
    frames = [x[:, j:j + st * (t_out - 1) + 1:st] for j in range(kt)]  # each (B, t_out, H, W, C)
    xs = jnp.concatenate(frames, axis=-1) if kt > 1 else frames[0]
    xs = xs.reshape((b * t_out,) + xs.shape[2:])
    w2 = jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, o)  # channel index j * C + c
    y = jax.lax.conv_general_dilated(xs, w2, strides[1:], padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape((b, t_out) + y.shape[1:])


def _causal3(cin: int, cout: int, cfg: WanVAEConfig, rngs: nnx.Rngs) -> Conv:
    """A 3x3x3 causal conv: the caller prepends the two past frames; H and W are zero-padded by 1."""
    return Conv(cin, cout, (3, 3, 3), cfg, rngs, padding=((0, 0), (1, 1), (1, 1)))


def _pointwise(cin: int, cout: int, cfg: WanVAEConfig, rngs: nnx.Rngs) -> Conv:
    return Conv(cin, cout, (1, 1, 1), cfg, rngs)


class RMSNorm(nnx.Module):
    """diffusers WanRMS_norm: ``x / max(||x||, 1e-12) * sqrt(C) * gamma`` over channels, in float32."""

    def __init__(self, channels: int, cfg: WanVAEConfig):
        pdtype, self.dtype = _dtypes(cfg)
        self.gamma = nnx.Param(jnp.ones((channels,), pdtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True))
        h = h / jnp.maximum(norm, _NORM_EPS) * (x.shape[-1] ** 0.5)
        return (h * self.gamma[...].astype(jnp.float32)).astype(self.dtype)


class ResidualBlock(nnx.Module):
    """RMS-SiLU-causal conv twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, cfg)
        self.conv1 = _causal3(cin, cout, cfg, rngs)
        self.norm2 = RMSNorm(cout, cfg)
        self.conv2 = _causal3(cout, cout, cfg, rngs)
        self.conv_shortcut = _pointwise(cin, cout, cfg, rngs) if cin != cout else None

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(cache.extend(nnx.silu(self.norm1(x)), CONTEXT))
        x = self.conv2(cache.extend(nnx.silu(self.norm2(x)), CONTEXT))
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over each frame's H*W positions (no temporal mixing)."""

    def __init__(self, channels: int, cfg: WanVAEConfig, rngs: nnx.Rngs):
        pdtype, dtype = _dtypes(cfg)
        self.implementation = cfg.attention
        self.norm = RMSNorm(channels, cfg)

        def linear(cin: int, cout: int, names: tuple[str, str]) -> nnx.Linear:  # 1x1 convs in the checkpoint
            return nnx.Linear(cin, cout, dtype=dtype, param_dtype=pdtype, rngs=rngs,
                              kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[1:]))

        # Named like the FLUX VAE's attention projections, so one rule table serves both.
        self.to_qkv = linear(channels, 3 * channels, ("embed", "heads"))
        self.proj = linear(channels, channels, ("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, hh, ww, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * f, hh * ww, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = attention(q, k, v, implementation=self.implementation)
        return x + self.proj(o.reshape(b, f, hh, ww, c))


class MidBlock(nnx.Module):
    """Residual block, per-frame attention, residual block."""

    def __init__(self, channels: int, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(channels, channels, cfg, rngs) for _ in range(2)])
        self.attention = AttentionBlock(channels, cfg, rngs)

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        x = self.resnets[0](x, cache)
        x = self.attention(x)
        return self.resnets[1](x, cache)


def _per_frame(conv: Conv, x: jax.Array) -> jax.Array:
    """Apply a 2-d conv to every frame of (B, F, H, W, C)."""
    b, f = x.shape[:2]
    y = conv(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


class Downsample(nnx.Module):
    """Spatial: pad right/bottom by 1, 3x3 stride-2 conv. Temporal ("3d"): then a (3, 1, 1)
    stride-2 conv over the previous chunk's last frame and this chunk; the first chunk's frame
    passes through (so 1 + 4k frames become 1 + 2k)."""

    def __init__(self, channels: int, temporal: bool, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.resample = Conv(channels, channels, (3, 3), cfg, rngs, strides=(2, 2), padding=((0, 1), (0, 1)))
        self.time_conv = (Conv(channels, channels, (3, 1, 1), cfg, rngs, strides=(2, 1, 1))
                          if temporal else None)

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        xc = cache.extend(x, 1)
        return x if cache.first else self.time_conv(xc)


class Upsample(nnx.Module):
    """Temporal ("3d"): a causal (3, 1, 1) conv to 2C channels whose halves become two frames; the
    first chunk's frame passes through, and the second chunk starts from zero context (not from the
    first frame), as in the reference. Then, per frame: nearest 2x and a 3x3 conv to ``cout``."""

    def __init__(self, channels: int, cout: int, temporal: bool, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.time_conv = Conv(channels, 2 * channels, (3, 1, 1), cfg, rngs) if temporal else None
        self.resample = Conv(channels, cout, (3, 3), cfg, rngs, padding=((1, 1), (1, 1)))

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        if self.time_conv is not None:
            if cache.first:
                cache.reset(x, CONTEXT)
            else:
                b, f, hh, ww, c = x.shape
                y = self.time_conv(cache.extend(x, CONTEXT)).reshape(b, f, hh, ww, 2, c)
                x = jnp.moveaxis(y, 4, 2).reshape(b, 2 * f, hh, ww, c)
        b, f, hh, ww, c = x.shape
        x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, f, hh, 2, ww, 2, c))
        return _per_frame(self.resample, x.reshape(b, f, 2 * hh, 2 * ww, c))


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, upsample: str | None, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, cfg, rngs)
                                 for j in range(cfg.num_res_blocks + 1)])
        self.upsample = (Upsample(cout, cout // 2, upsample == "3d", cfg, rngs)
                         if upsample is not None else None)

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsample is None else self.upsample(x, cache)


class Encoder(nnx.Module):
    """One chunk of frames -> one chunk of ``2 * z_dim``-channel latents (mean and log-variance)."""

    def __init__(self, cfg: WanVAEConfig, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv_in = _causal3(cfg.in_channels, dims[0], cfg, rngs)
        blocks: list[nnx.Module] = []
        for i in range(n):
            cin, cout = dims[i], dims[i + 1]
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, cfg, rngs))
                cin = cout
            if i < n - 1:
                blocks.append(Downsample(cout, cfg.temperal_downsample[i], cfg, rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg, rngs)
        self.norm_out = RMSNorm(dims[-1], cfg)
        self.conv_out = _causal3(dims[-1], 2 * cfg.z_dim, cfg, rngs)

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        x = self.conv_in(cache.extend(x, CONTEXT))
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(cache.extend(nnx.silu(self.norm_out(x)), CONTEXT))


class Decoder(nnx.Module):
    """One chunk of latents (after ``post_quant_conv``) -> one chunk of frames."""

    def __init__(self, cfg: WanVAEConfig, rngs: nnx.Rngs):
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *reversed(mult))]
        n = len(mult)
        self.conv_in = _causal3(cfg.z_dim, dims[0], cfg, rngs)
        self.mid_block = MidBlock(dims[0], cfg, rngs)
        blocks = []
        for i in range(n):
            # Each upsampler halves the channels, so blocks after the first take dims[i] // 2.
            cin = dims[i] if i == 0 else dims[i] // 2
            mode = None if i == n - 1 else ("3d" if cfg.temporal_upsample[i] else "2d")
            blocks.append(UpBlock(cin, dims[i + 1], mode, cfg, rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], cfg)
        self.conv_out = _causal3(dims[-1], cfg.out_channels, cfg, rngs)

    def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
        x = self.conv_in(cache.extend(x, CONTEXT))
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(cache.extend(nnx.silu(self.norm_out(x)), CONTEXT))


def _run_chunks(module: nnx.Module, x: jax.Array, chunk: int) -> jax.Array:
    """``module`` over frames ``x[:, :1]``, then ``x[:, 1:]`` in chunks of ``chunk`` frames (a scan
    carrying the causal context), outputs concatenated along frames. Up to ``UNROLL_CHUNKS`` chunks
    run as plain calls instead: the same computation, and on CPU its gradient is about 7 times
    faster than through the scan (what the video toy world's VAE pretraining needs)."""
    first_cache = ChunkCache()
    out = module(x[:, :1], first_cache)
    rest = x.shape[1] - 1
    if rest == 0:
        return out
    b = x.shape[0]
    if rest // chunk <= UNROLL_CHUNKS:
        outs, context = [out], first_cache.done()
        for i in range(1, x.shape[1], chunk):
            cache = ChunkCache(context)
            outs.append(module(x[:, i:i + chunk], cache))
            context = cache.done()
        return jnp.concatenate(outs, axis=1)
    xs = jnp.moveaxis(x[:, 1:].reshape(b, rest // chunk, chunk, *x.shape[2:]), 1, 0)
    graphdef, state = nnx.split(module)

    def body(carry, xt):
        cache = ChunkCache(carry)
        y = nnx.merge(graphdef, state)(xt, cache)
        return cache.done(), y

    _, ys = jax.lax.scan(body, first_cache.done(), xs)
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(b, ys.shape[1] * ys.shape[2], *ys.shape[3:])
    return jnp.concatenate([out, ys], axis=1)


class WanVAE(nnx.Module):
    """``encode(video) -> (mean, logvar)``, ``decode(latents) -> video``; raw (unnormalised) latents."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.quant_conv = _pointwise(2 * cfg.z_dim, 2 * cfg.z_dim, cfg, rngs)
        self.post_quant_conv = _pointwise(cfg.z_dim, cfg.z_dim, cfg, rngs)
        self.decoder = Decoder(cfg, rngs)

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video (B, F, H, W, in_channels) in [-1, 1], F = 1 + 4k -> posterior mean and log-variance
        (clamped to [-30, 20] as diffusers does), each (B, 1 + 4k / temporal_factor, H / 8, W / 8,
        z_dim) in float32."""
        if video.ndim != 5 or video.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"WanVAE.encode: expected (B, F, H, W, {self.cfg.in_channels}), got {video.shape}")
        if (video.shape[1] - 1) % ENCODER_CHUNK:
            raise ValueError(f"WanVAE.encode: {video.shape[1]} frames; the Wan VAE takes 1 + 4k frames")
        h = _run_chunks(self.encoder, video.astype(self.cfg.dtype), ENCODER_CHUNK)
        h = self.quant_conv(h).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents (B, f, h, w, z_dim) -> video (B, 1 + 4(f - 1), 8h, 8w, out_channels) in
        float32, clipped to [-1, 1] as diffusers' decode does."""
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"WanVAE.decode: expected (B, f, h, w, {self.cfg.z_dim}), got {z.shape}")
        x = self.post_quant_conv(z.astype(self.cfg.dtype))
        video = _run_chunks(self.decoder, x, 1)
        return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)

    def sample(self, video: jax.Array, key: jax.Array) -> jax.Array:
        """Encode and draw raw latents from the posterior."""
        mean, logvar = self.encode(video)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _stats(cfg: WanVAEConfig) -> tuple[jax.Array, jax.Array]:
    return (jnp.asarray(cfg.latents_mean, jnp.float32), jnp.asarray(cfg.latents_std, jnp.float32))


def latents_to_model(z: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """VAE latents (channels last) -> the Wan DiT's latent space: ``(z - latents_mean) / latents_std``."""
    mean, std = _stats(cfg)
    return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)


def model_to_latents(x: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """Inverse of :func:`latents_to_model`: ``x * latents_std + latents_mean`` (what the Wan pipeline
    applies before decoding)."""
    mean, std = _stats(cfg)
    return (x.astype(jnp.float32) * std + mean).astype(x.dtype)


def decode_to_unit(vae: WanVAE, x_model: jax.Array) -> jax.Array:
    """DiT latents (B, f, h, w, z_dim) -> video (B, 1 + 4(f - 1), 8h, 8w, 3) in [0, 1], float32."""
    video = vae.decode(model_to_latents(x_model.astype(jnp.float32), vae.cfg))
    return jnp.clip((video + 1.0) * 0.5, 0.0, 1.0)
