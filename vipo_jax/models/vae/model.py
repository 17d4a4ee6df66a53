"""KL autoencoder (diffusers ``AutoencoderKL``: the FLUX.1 / SD VAE) in Flax NNX.

Layout is NHWC throughout: images (B, H, W, 3) in [-1, 1], latents (B, h, w, latent_channels).
Module names follow diffusers where they can (``encoder.down_blocks.0.resnets.1.conv2``), with the
one-element ``downsamplers.0`` / ``upsamplers.0`` / ``attentions.0`` lists flattened to
``downsample`` / ``upsample`` / ``attention``. Group norms (eps 1e-6) and the attention softmax are
computed in float32 whatever the compute dtype; ``encode`` and ``decode`` return float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.vae.config import AutoencoderKLConfig
from vipo_jax.nn.annotate import conv_init, linear_init
from vipo_jax.nn.attention import attention
from vipo_jax.nn.stack import remat_policy

_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis, computed in float32."""

    def __init__(self, channels: int, groups: int, cfg: AutoencoderKLConfig):
        self.groups = groups
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = nnx.Param(jnp.ones((channels,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        h = x.astype(jnp.float32).reshape(*lead, self.groups, c // self.groups)
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
        mean = jnp.mean(h, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
        h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(self.dtype)


def _conv(cin: int, cout: int, kernel: int, cfg: AutoencoderKLConfig, rngs: nnx.Rngs, *,
          stride: int = 1, padding=None) -> nnx.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
                    use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                    rngs=rngs, **conv_init())


def _linear(cin: int, cout: int, cfg: AutoencoderKLConfig, rngs: nnx.Rngs, names: tuple) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=True, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **linear_init(*names))


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv, GN-SiLU-conv, + shortcut."""

    def __init__(self, cin: int, cout: int, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        g = cfg.norm_num_groups
        self.norm1 = GroupNorm(cin, g, cfg)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = GroupNorm(cout, g, cfg)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, with a group norm and a residual."""

    def __init__(self, channels: int, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.implementation = cfg.attention
        self.group_norm = GroupNorm(channels, cfg.norm_num_groups, cfg)
        self.to_q = _linear(channels, channels, cfg, rngs, ("embed", "heads"))
        self.to_k = _linear(channels, channels, cfg, rngs, ("embed", "heads"))
        self.to_v = _linear(channels, channels, cfg, rngs, ("embed", "heads"))
        self.to_out = _linear(channels, channels, cfg, rngs, ("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(b, hh * ww, 1, c)
        o = attention(self.to_q(h), self.to_k(h), self.to_v(h), implementation=self.implementation)
        return x + self.to_out(o.reshape(b, hh, ww, c))


class MidBlock(nnx.Module):
    """diffusers UNetMidBlock2D with one layer: resnet, (attention), resnet."""

    def __init__(self, channels: int, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs) for _ in range(2)])
        self.attention = AttentionBlock(channels, cfg, rngs) if cfg.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """diffusers DownEncoderBlock2D: resnets, then a stride-2 conv padded (0, 1) on H and W."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool,
                 cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs)
                                 for i in range(num_layers)])
        self.downsample = (_conv(cout, cout, 3, cfg, rngs, stride=2, padding=((0, 1), (0, 1)))
                           if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def _upsample_nearest2x(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class UpBlock(nnx.Module):
    """diffusers UpDecoderBlock2D: resnets, then nearest 2x upsampling and a 3x3 conv."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool,
                 cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs)
                                 for i in range(num_layers)])
        self.upsample = _conv(cout, cout, 3, cfg, rngs) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(_upsample_nearest2x(x))
        return x


def _run(block: nnx.Module, x: jax.Array, remat: str) -> jax.Array:
    if remat == "none":
        return block(x)
    graphdef, state = nnx.split(block)
    fn = jax.checkpoint(lambda st, h: nnx.merge(graphdef, st)(h), policy=remat_policy(remat),
                        prevent_cse=False)
    return fn(state, x)


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        self.remat = cfg.remat
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, cfg, rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, cfg, rngs)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], cfg, rngs)
        self.conv_norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, cfg)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x, self.remat)
        x = _run(self.mid_block, x, self.remat)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
        ch = tuple(reversed(cfg.block_out_channels))
        self.remat = cfg.remat
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, cfg, rngs)
        self.mid_block = MidBlock(ch[0], cfg, rngs)
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, i < len(ch) - 1, cfg, rngs)
            for i in range(len(ch))
        ])
        self.conv_norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, cfg)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, cfg, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = _run(self.mid_block, x, self.remat)
        for block in self.up_blocks:
            x = _run(block, x, self.remat)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """``encode(images) -> (mean, logvar)``, ``decode(latents) -> images``; raw (unscaled) latents."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        c = cfg.latent_channels
        self.quant_conv = _conv(2 * c, 2 * c, 1, cfg, rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(c, c, 1, cfg, rngs) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior mean and log-variance (clamped to
        [-30, 20] as diffusers does), each (B, H/f, W/f, latent_channels) in float32."""
        h = self.encoder(x.astype(jnp.dtype(self.cfg.dtype)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32,
        nominally in [-1, 1] (not clipped)."""
        z = z.astype(jnp.dtype(self.cfg.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def sample(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """Encode and draw raw latents from the posterior."""
        mean, logvar = self.encode(x)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(x)[0])


def latents_to_model(z_raw: jax.Array, cfg: AutoencoderKLConfig) -> jax.Array:
    """VAE latents -> the diffusion model's latent space: ``(z - shift_factor) * scaling_factor``."""
    return (z_raw - cfg.shift) * cfg.scaling_factor


def model_to_latents(z: jax.Array, cfg: AutoencoderKLConfig) -> jax.Array:
    """Inverse of :func:`latents_to_model`: ``z / scaling_factor + shift_factor``."""
    return z / cfg.scaling_factor + cfg.shift


def decode_to_unit(vae: AutoencoderKL, z_model: jax.Array) -> jax.Array:
    """Diffusion-model latents (NHWC) -> images (B, H, W, C) in [0, 1], float32."""
    x = vae.decode(model_to_latents(z_model.astype(jnp.float32), vae.cfg))
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)
