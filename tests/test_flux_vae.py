"""Parity of the Flax KL autoencoder (FLUX.1 VAE) with diffusers' AutoencoderKL, the BFL
``ae.safetensors`` layout, and strict-loading errors."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError
from vipo_jax.models.vae import (
    FLUX1_VAE,
    AutoencoderKL,
    AutoencoderKLConfig,
    convert_bfl_ae,
    convert_diffusers,
    decode_to_unit,
    latents_to_model,
    model_to_latents,
)
from vipo_jax.models.vae import from_pretrained as load_vae
from vipo_jax.weights.loading import abstract_params
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

# FLUX-like: 16 latent channels, no quant convs, mid-block attention, 3 blocks -> 4x downsampling.
TINY = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
    norm_num_groups=4, latent_channels=16, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
# SD-like: quant convs, no mid attention, 2 resnets per block, 2x downsampling.
QUANT = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=2,
    norm_num_groups=4, latent_channels=4, sample_size=32, scaling_factor=0.18215,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
)
B, H, W = 2, 32, 48  # non-square


@pytest.fixture(scope="module", autouse=True)
def _no_torchvision_ops():
    """diffusers imports transformers, which imports torchvision, whose compiled ops do not match
    the CPU torch wheel: skip its fake-op registrations (unused here), as tests.utils does for
    open_clip."""
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


def _run(fn, model, x):
    graphdef, state = nnx.split(model)
    return fn(graphdef, state, jnp.asarray(x))


def _nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _reference(torch, cfg: dict, folder):
    """A random diffusers AutoencoderKL (norms and attention made non-trivial), saved with
    save_pretrained, and its outputs on NHWC inputs."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    vae = TorchVAE(**cfg).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif "to_q.weight" in name or "to_k.weight" in name:
                p.mul_(4.0)  # peaky attention, so a wrong softmax axis or scale shows
    vae.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, H, W, cfg["in_channels"])).astype(np.float32)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    z = rng.standard_normal((B, H // f, W // f, cfg["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(_nchw(x))).latent_dist
        image = vae.decode(torch.from_numpy(_nchw(z))).sample
    return dict(torch_model=vae, folder=folder, x=x, z=z, mean=_nhwc(post.mean), logvar=_nhwc(post.logvar),
                image=_nhwc(image))


@pytest.fixture(scope="module")
def tiny(torch, tmp_path_factory):
    ref = _reference(torch, TINY, tmp_path_factory.mktemp("tiny_vae"))
    ref["model"] = load_vae(ref["folder"])
    return ref


@pytest.fixture(scope="module")
def quant(torch, tmp_path_factory):
    ref = _reference(torch, QUANT, tmp_path_factory.mktemp("quant_vae"))
    ref["model"] = load_vae(ref["folder"])
    return ref


def _check_encode(ref, model, what):
    mean, logvar = _run(_encode, model, ref["x"])
    e1 = assert_close(mean, ref["mean"], what=f"{what} mean")
    e2 = assert_close(logvar, ref["logvar"], what=f"{what} logvar")
    print(f"{what}: encode mean err {e1:.2e}, logvar err {e2:.2e}")


def _check_decode(ref, model, what):
    image = _run(_decode, model, ref["z"])
    err = assert_close(image, ref["image"], what=f"{what} decode")
    print(f"{what}: decode err {err:.2e}")


@pytest.mark.parametrize("name", ["tiny", "quant"])
def test_encode_parity(request, name):
    ref = request.getfixturevalue(name)
    assert ref["mean"].shape == ref["logvar"].shape == (B, H // 4 if name == "tiny" else H // 2,
                                                         W // 4 if name == "tiny" else W // 2,
                                                         16 if name == "tiny" else 4)
    _check_encode(ref, ref["model"], name)


@pytest.mark.parametrize("name", ["tiny", "quant"])
def test_decode_parity(request, name):
    ref = request.getfixturevalue(name)
    assert ref["image"].shape == (B, H, W, 3)
    _check_decode(ref, ref["model"], name)


def test_config_from_folder(tiny, quant):
    cfg = tiny["model"].cfg
    assert cfg.latent_channels == 16 and cfg.block_out_channels == (8, 16, 16)
    assert cfg.scaling_factor == pytest.approx(0.3611) and cfg.shift_factor == pytest.approx(0.1159)
    assert not cfg.use_quant_conv and tiny["model"].quant_conv is None
    assert quant["model"].cfg.use_quant_conv and quant["model"].cfg.shift_factor is None
    assert AutoencoderKLConfig.flux1().block_out_channels == (128, 256, 512, 512)


def test_pipeline_root_and_single_file(tiny, tmp_path):
    """A pipeline folder holding vae/, and the diffusers weights file itself (config.json beside it)."""
    shutil.copytree(tiny["folder"], tmp_path / "vae")
    for path in (tmp_path, tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        model = load_vae(path)
        assert model.cfg == tiny["model"].cfg
        np.testing.assert_array_equal(np.asarray(model.decoder.conv_out.kernel[...]),
                                      np.asarray(tiny["model"].decoder.conv_out.kernel[...]))


# ----------------------------------------------------------------------------- BFL / LDM layout


def _diffusers_to_ldm_key(key: str, n_blocks: int) -> str:
    """Inverse of diffusers' convert_ldm_vae_checkpoint key mapping."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
    if m:
        key = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
    return key


def _to_ldm(state_dict: dict, n_blocks: int) -> dict:
    out = {}
    for k, v in state_dict.items():
        nk = _diffusers_to_ldm_key(k, n_blocks)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and not nk.endswith("norm.weight"):
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convs
        assert nk not in out, nk
        out[nk] = v.contiguous()
    return out


def test_ldm_inverse_mapping_is_exact(tiny, torch):
    """Our inverse, fed to diffusers' own LDM converter, gives back the diffusers state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = tiny["torch_model"].state_dict()
    ldm = _to_ldm(sd, len(TINY["block_out_channels"]))
    assert "encoder.down.0.block.0.norm1.weight" in ldm and "decoder.up.2.block.0.conv1.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(tiny["torch_model"].config))
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.fixture(scope="module")
def bfl_file(tiny, tmp_path_factory):
    from safetensors.torch import save_file

    ldm = _to_ldm(tiny["torch_model"].state_dict(), len(TINY["block_out_channels"]))
    path = tmp_path_factory.mktemp("bfl") / "ae.safetensors"
    save_file(ldm, str(path))
    return path


def test_bfl_ae_parity(tiny, bfl_file):
    model = load_vae(bfl_file, config=TINY)
    a = nnx.to_flat_state(nnx.state(model))
    b = dict(nnx.to_flat_state(nnx.state(tiny["model"])))
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(b[path].get_value()),
                                      err_msg=str(path))
    _check_encode(tiny, model, "bfl")
    _check_decode(tiny, model, "bfl")


def test_bfl_prefix(tiny, bfl_file):
    cfg = AutoencoderKLConfig.from_dict(TINY)
    tensors = SafetensorsFile(bfl_file)
    plain = convert_bfl_ae(tensors, cfg)
    prefixed = {"first_stage_model." + k: tensors[k] for k in tensors}
    got = convert_bfl_ae(prefixed, cfg, prefix="first_stage_model.")
    assert sorted(got) == sorted(plain)
    for k in plain:
        np.testing.assert_array_equal(got[k], plain[k])


def test_single_file_defaults_to_flux_config(bfl_file):
    with pytest.raises(CheckpointError, match=r"'encoder\.conv_in\.weight'.*expects \(3, 3, 3, 128\)"):
        load_vae(bfl_file)


def test_flux1_key_layouts(torch):
    """The real FLUX.1 VAE's diffusers and BFL key sets (built from a meta-device diffusers model,
    no memory) convert to exactly our model's parameters with the right shapes."""
    from diffusers import AutoencoderKL as TorchVAE

    with torch.device("meta"):
        ref = TorchVAE(**FLUX1_VAE)
    sd = ref.state_dict()
    cfg = AutoencoderKLConfig.flux1()
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    want = {k: v.shape for k, v in abstract_params(abstract).items()}

    def zeros(shape):
        return np.broadcast_to(np.zeros((), np.float32), tuple(shape))

    diff = convert_diffusers({k: zeros(v.shape) for k, v in sd.items()}, cfg, expected=want)
    ldm = _to_ldm({k: torch.empty(v.shape, device="meta") for k, v in sd.items()}, 4)
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.block.0.nin_shortcut.weight" in ldm
    bfl = convert_bfl_ae({k: zeros(v.shape) for k, v in ldm.items()}, cfg, expected=want)
    for got in (diff, bfl):
        assert sorted(got) == sorted(want)
        assert all(tuple(got[k].shape) == tuple(want[k]) for k in want)
    n = sum(int(np.prod(s)) for s in want.values())
    assert n == sum(v.numel() for v in sd.values()) == 83_819_683


# ----------------------------------------------------------------------------- helpers


@functools.partial(jax.jit, static_argnums=0)
def _decode_unit(graphdef, state, z):
    return decode_to_unit(nnx.merge(graphdef, state), z)


def test_latent_scaling_and_decode_to_unit(tiny):
    cfg = tiny["model"].cfg
    z_raw = jnp.asarray(tiny["z"])
    z_model = latents_to_model(z_raw, cfg)
    np.testing.assert_allclose(z_model, (tiny["z"] - 0.1159) * 0.3611, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model_to_latents(z_model, cfg), tiny["z"], rtol=1e-5, atol=1e-5)
    unit = _run(_decode_unit, tiny["model"], z_model)
    want = np.clip((tiny["image"] + 1) / 2, 0, 1)
    err = assert_close(unit, want, what="decode_to_unit")
    print(f"decode_to_unit err {err:.2e}")
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1


# ----------------------------------------------------------------------------- errors


def _corrupt_copy(tiny, tmp_path, edit):
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(tiny["folder"] / "config.json", folder / "config.json")
    src = SafetensorsFile(tiny["folder"] / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(src[k]) for k in src}
    edit(tensors)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    return folder


def test_missing_key(tiny, tmp_path):
    folder = _corrupt_copy(tiny, tmp_path, lambda t: t.pop("decoder.up_blocks.1.resnets.0.norm2.bias"))
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.up_blocks\.1\.resnets\.0\.norm2\.bias'"):
        load_vae(folder)


def test_unexpected_key(tiny, tmp_path):
    folder = _corrupt_copy(tiny, tmp_path, lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.extra\.weight"):
        load_vae(folder)


def test_wrong_shape(tiny, tmp_path):
    def edit(t):
        t["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)

    folder = _corrupt_copy(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'decoder\.conv_out\.weight'.*\(3, 8, 1, 1\)"):
        load_vae(folder)


def test_wrong_config_fails(tiny, tmp_path):
    folder = _corrupt_copy(tiny, tmp_path, lambda t: None)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.down_blocks\.0\.resnets\.1\."):
        load_vae(folder)


def test_missing_config_json(tiny, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(tiny["folder"] / "diffusion_pytorch_model.safetensors", folder)
    with pytest.raises(CheckpointError, match=rf"no config\.json in {re.escape(str(folder))}"):
        load_vae(folder)


# ----------------------------------------------------------------------------- runtime options


@functools.partial(jax.jit, static_argnums=0)
def _decode_grad(graphdef, state, z):
    return jax.grad(lambda z: jnp.mean(jnp.square(nnx.merge(graphdef, state).decode(z))))(z)


def test_remat_gradients_match(tiny):
    g0 = np.asarray(_run(_decode_grad, tiny["model"], tiny["z"]))
    model = load_vae(tiny["folder"], remat="full")
    assert model.cfg.remat == "full"
    g1 = np.asarray(_run(_decode_grad, model, tiny["z"]))
    scale = float(np.max(np.abs(g0)))
    assert scale > 0
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5 * scale)


def test_bfloat16(tiny):
    model = load_vae(tiny["folder"], param_dtype="bfloat16", dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    image = _run(_decode, model, tiny["z"])
    assert image.dtype == jnp.float32
    err = float(np.max(np.abs(np.asarray(image) - tiny["image"])))
    print(f"bfloat16 decode err {err:.2e}")
    assert err < 5e-2 * max(1.0, float(np.max(np.abs(tiny["image"]))))
