"""Parity of the Flax Wan2.1 video VAE with diffusers' AutoencoderKLWan (its chunked encode /
decode with the causal feature cache), the real Wan2.1 key layout, and strict-loading errors."""

from __future__ import annotations

import functools
import inspect
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.wan_vae import (
    WAN21_VAE,
    WanVAE,
    WanVAEConfig,
    convert_diffusers,
    decode_to_unit,
    latents_to_model,
    model_to_latents,
)
from vipo_jax.models.wan_vae import from_pretrained as load_wan_vae
from vipo_jax.weights.loading import abstract_params
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

# The Wan2.1 layout at a tiny width: stage 0 downsamples spatially only, stages 1 and 2 in time
# too (8x spatial, 4x temporal), so every resampler kind (2d / 3d, down / up), the channel-changing
# shortcuts and both mid-block attentions are exercised.
TINY = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            temperal_downsample=[False, True, True])
B, H, W = 2, 32, 48  # non-square frames; latents are 4 x 6


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


@functools.partial(jax.jit, static_argnums=0)
def _decode_unit(graphdef, state, z):
    return decode_to_unit(nnx.merge(graphdef, state), z)


def _run(fn, model, x):
    graphdef, state = nnx.split(model)
    return fn(graphdef, state, jnp.asarray(x))


def _to_torch(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))  # (B, F, H, W, C) -> (B, C, F, H, W)


def _from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.fixture(scope="module")
def tiny(torch, tmp_path_factory):
    """A random AutoencoderKLWan (norm gammas non-trivial, peaky attention, decoder output mostly
    inside the [-1, 1] clamp) saved with save_pretrained; its outputs; and our loaded model."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("to_qkv.weight"):
                p[: 2 * p.shape[1]].mul_(4.0)  # q and k rows: a wrong softmax axis or scale shows
            elif name == "decoder.conv_out.weight":
                p.mul_(0.5)
    folder = tmp_path_factory.mktemp("wan_vae") / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (B, 9, H, W, 3)).astype(np.float32)
    z = rng.standard_normal((B, 3, H // 8, W // 8, 16)).astype(np.float32)
    ref = dict(torch_model=vae, folder=folder, video=video, z=z, decoded={}, mean={}, logvar={})
    with torch.no_grad():
        for f in (1, 2, 3):
            ref["decoded"][f] = _from_torch(vae.decode(_to_torch(torch, z[:, :f])).sample)
        for f in (1, 5, 9):
            post = vae.encode(_to_torch(torch, video[:, :f])).latent_dist
            ref["mean"][f], ref["logvar"][f] = _from_torch(post.mean), _from_torch(post.logvar)
    ref["model"] = load_wan_vae(folder)
    return ref


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_decode_parity(tiny, frames):
    want = tiny["decoded"][frames]
    assert want.shape == (B, 1 + 4 * (frames - 1), H, W, 3)
    assert np.mean(np.abs(want) < 1.0) > 0.95  # mostly inside the clamp, so the comparison means something
    got = _run(_decode, tiny["model"], tiny["z"][:, :frames])
    err = assert_close(got, want, what=f"decode of {frames} latent frames")
    print(f"decode {frames} latent frames: max abs err {err:.2e}")


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_parity(tiny, frames):
    mean, logvar = _run(_encode, tiny["model"], tiny["video"][:, :frames])
    assert mean.shape == (B, 1 + (frames - 1) // 4, H // 8, W // 8, 16)
    e1 = assert_close(mean, tiny["mean"][frames], what=f"encode {frames} frames mean")
    e2 = assert_close(logvar, tiny["logvar"][frames], what=f"encode {frames} frames logvar")
    print(f"encode {frames} frames: mean err {e1:.2e}, logvar err {e2:.2e}")


def test_decode_is_causal(tiny):
    """A frame never depends on later latents: decoding a prefix gives the prefix of the video."""
    full = np.asarray(_run(_decode, tiny["model"], tiny["z"][:, :3]))
    np.testing.assert_allclose(full[:, :5], np.asarray(_run(_decode, tiny["model"], tiny["z"][:, :2])),
                               rtol=0, atol=1e-5)


def test_scan_keeps_trace_size_constant(tiny):
    """Chunks after the first run in one scan (beyond UNROLL_CHUNKS of them): the program does not
    grow with the clip length."""
    from vipo_jax.models.wan_vae.model import UNROLL_CHUNKS

    graphdef, state = nnx.split(tiny["model"])

    def size(fn, shape):
        jaxpr = jax.make_jaxpr(lambda s, x: getattr(nnx.merge(graphdef, s), fn)(x))(
            state, jax.ShapeDtypeStruct(shape, jnp.float32))
        return len(jaxpr.jaxpr.eqns)

    n = UNROLL_CHUNKS + 2  # latent frames: first + UNROLL_CHUNKS + 1 chunks, scanned
    assert size("decode", (1, n, 4, 6, 16)) == size("decode", (1, 21, 4, 6, 16))
    assert size("encode", (1, 1 + 4 * (n - 1), 32, 48, 3)) == size("encode", (1, 81, 32, 48, 3))


def test_unrolled_and_scanned_chunks_agree(tiny, monkeypatch):
    """Short clips run their chunks as plain calls, long ones in a scan: the same numbers."""
    from vipo_jax.models.wan_vae import model as wan_vae_model

    z, video = tiny["z"][:, :3], tiny["video"][:, :9]
    unrolled = _run(_decode, tiny["model"], z), _run(_encode, tiny["model"], video)[0]
    monkeypatch.setattr(wan_vae_model, "UNROLL_CHUNKS", 0)
    graphdef, state = nnx.split(tiny["model"])
    scanned = (jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x))(state, z),
               jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])(state, video))
    for a, b in zip(unrolled, scanned):
        assert_close(a, b, rel=1e-5, what="unrolled vs scanned chunks")


def test_encode_needs_1_plus_4k_frames(tiny):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        tiny["model"].encode(jnp.zeros((1, 6, H, W, 3)))
    with pytest.raises(ValueError, match="expected"):
        tiny["model"].decode(jnp.zeros((1, 2, 4, 6, 8)))


def test_config_from_folder_and_preset(tiny, torch):
    from diffusers import AutoencoderKLWan

    cfg = tiny["model"].cfg
    assert cfg.dim_mult == (1, 2, 4, 4) and cfg.temperal_downsample == (False, True, True)
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
    assert cfg.latent_frames(81) == 21 and cfg.video_frames(21) == 81
    # The preset is diffusers' defaults (the Wan2.1 VAE), latents statistics included.
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    real = WanVAEConfig.wan21()
    for k, v in WAN21_VAE.items():
        assert defaults[k] == v, k
        got = getattr(real, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, k
    assert real.latents_mean == pytest.approx(tuple(defaults["latents_mean"]))
    assert real == WanVAEConfig()


def test_pipeline_root_and_weights_file(tiny, tmp_path):
    shutil.copytree(tiny["folder"], tmp_path / "vae")
    for path in (tmp_path, tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        model = load_wan_vae(path)
        assert model.cfg == tiny["model"].cfg
        np.testing.assert_array_equal(np.asarray(model.decoder.conv_out.kernel[...]),
                                      np.asarray(tiny["model"].decoder.conv_out.kernel[...]))


def test_wan21_key_layout(torch):
    """The real Wan2.1 VAE's key set (a meta-device diffusers model, no memory) converts to exactly
    our model's parameters, with the right shapes and logical axis names."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        sd = AutoencoderKLWan(**WAN21_VAE).state_dict()
    cfg = WanVAEConfig.wan21()
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    want = {k: v.shape for k, v in abstract_params(abstract).items()}
    zeros = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in sd.items()}
    got = convert_diffusers(zeros, cfg, expected=want)
    assert sorted(got) == sorted(want)
    assert all(tuple(got[k].shape) == tuple(want[k]) for k in want)
    n = sum(int(np.prod(s)) for s in want.values())
    assert n == sum(v.numel() for v in sd.values())
    print(f"Wan2.1 VAE: {n:,} parameters")
    attn = {"to_qkv": ("embed", "heads"), "proj": ("heads", "embed")}  # as the FLUX VAE's attention
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        names = var.get_metadata().get("out_sharding")
        name = ".".join(map(str, path))
        assert names is not None and len(names) == var.get_value().ndim, name
        if path[-1] == "gamma":
            assert names == ("norm",), name
        elif path[-2] in attn:
            assert names == (attn[path[-2]] if path[-1] == "kernel" else attn[path[-2]][1:]), name
        elif path[-1] == "kernel":
            assert names[-2:] == ("conv_in", "conv_out") and not any(names[:-2]), name
        else:
            assert names == ("conv_out",), name


def test_latent_normalisation_and_decode_to_unit(tiny):
    cfg = tiny["model"].cfg
    z = tiny["z"][:, :2]
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    x = latents_to_model(jnp.asarray(z), cfg)
    np.testing.assert_allclose(x, (z - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model_to_latents(x, cfg), z, rtol=1e-5, atol=1e-5)
    unit = _run(_decode_unit, tiny["model"], x)
    err = assert_close(unit, (tiny["decoded"][2] + 1) / 2, what="decode_to_unit")
    print(f"decode_to_unit err {err:.2e}")
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1


def test_bfloat16(tiny):
    model = load_wan_vae(tiny["folder"], param_dtype="bfloat16", dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    video = _run(_decode, model, tiny["z"][:, :2])
    assert video.dtype == jnp.float32
    diff = np.abs(np.asarray(video) - tiny["decoded"][2])
    print(f"bfloat16 decode err: max {diff.max():.2e}, mean {diff.mean():.2e}")
    # diffusers itself in bfloat16 is off by max 0.16 / mean 8.6e-3 on this model (ours: 0.13 / 8.3e-3).
    assert diff.mean() < 2e-2 and diff.max() < 0.25


# ----------------------------------------------------------------------------- errors


def _copy(tiny, tmp_path, edit=None, edit_config=None):
    folder = tmp_path / "vae"
    folder.mkdir()
    cfg = json.loads((tiny["folder"] / "config.json").read_text())
    if edit_config is not None:
        edit_config(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    src = SafetensorsFile(tiny["folder"] / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(src[k]) for k in src}
    if edit is not None:
        edit(tensors)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    return folder


def test_missing_key(tiny, tmp_path):
    folder = _copy(tiny, tmp_path, lambda t: t.pop("decoder.up_blocks.1.upsamplers.0.time_conv.bias"))
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.up_blocks\.1\.upsamplers\.0\.time_conv\.bias'"):
        load_wan_vae(folder)


def test_unexpected_key(tiny, tmp_path):
    folder = _copy(tiny, tmp_path, lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.extra\.weight"):
        load_wan_vae(folder)


def test_wrong_shape(tiny, tmp_path):
    def edit(t):
        t["encoder.down_blocks.1.resample.1.weight"] = np.zeros((4, 4, 1, 1), np.float32)

    folder = _copy(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch for 'encoder\.down_blocks\.1\.resample\.1\.weight'.*\(4, 4, 1, 1\)"):
        load_wan_vae(folder)


def test_config_not_matching_checkpoint(tiny, tmp_path):
    folder = _copy(tiny, tmp_path, edit_config=lambda c: c.update(temperal_downsample=[True, False, True]))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.down_blocks\.1\.time_conv\.weight'"):
        load_wan_vae(folder)


def test_config_of_another_class(tiny, tmp_path):
    folder = _copy(tiny, tmp_path, edit_config=lambda c: c.update(_class_name="AutoencoderKL"))
    with pytest.raises(CheckpointError, match="describes a AutoencoderKL, not a AutoencoderKLWan"):
        load_wan_vae(folder)


WAN22_TI2V_VAE = dict(  # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (architecture fields)
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)


def test_wan22_config_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="Wan 2.2"):
        WanVAEConfig.from_dict(WAN22_TI2V_VAE)
    folder = _copy(tiny, tmp_path, edit_config=lambda c: c.update(WAN22_TI2V_VAE))
    with pytest.raises(ConfigError, match="Wan 2.2"):
        load_wan_vae(folder)


@pytest.mark.parametrize("bad, match", [
    (dict(temperal_downsample=[True, True]), "needs 3 entries"),
    (dict(temperal_downsample=[True, True, True], scale_factor_temporal=8), "at most 2"),
    (dict(scale_factor_spatial=16), "scale_factor_spatial=16"),
    (dict(latents_mean=[0.0] * 4), "latents_mean"),
    (dict(attn_scales=[1.0]), "attn_scales"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        WanVAEConfig.from_dict({**WAN21_VAE, **bad})


def test_unknown_override_refused():
    with pytest.raises(ConfigError, match="unknown option"):
        WanVAEConfig.wan21(remat="full")
