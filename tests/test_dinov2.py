"""DINOv2 parity against transformers' Dinov2Model / Dinov2WithRegistersModel (tiny random
configs saved with save_pretrained), position-embedding interpolation against torch's
F.interpolate, preprocessing, and strict-loading errors."""

from __future__ import annotations

import json
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
from vipo_jax.models.dinov2 import Dinov2Config, patch_tokens, preprocess, preset, resize_bicubic_torch
from vipo_jax.models.dinov2 import from_pretrained as load_dinov2
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)


def _transformers():
    # transformers imports torchvision, whose fake-op registrations fail against the CPU torch
    # wheel; we never use those ops (same workaround as tests.utils.import_open_clip).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


def _randomise(torch, model, seed):
    """Random weights of a useful scale (the default init has std 0.02, unit norms and layer
    scales), so that every parameter, the position embeddings included, affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                p.copy_(1.0 + 0.2 * noise)
            elif "position_embeddings" in name or "token" in name:
                p.copy_(noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module")
def checkpoints(torch, tmp_path_factory):
    """{name: (folder, torch model)} for plain, with-registers and SwiGLU tiny models."""
    tf = _transformers()
    specs = {
        "plain": (tf.Dinov2Model, tf.Dinov2Config, {}),
        "registers": (tf.Dinov2WithRegistersModel, tf.Dinov2WithRegistersConfig, {"num_register_tokens": 4}),
        "swiglu": (tf.Dinov2Model, tf.Dinov2Config, {"use_swiglu_ffn": True}),
    }
    out = {}
    for i, (name, (cls, cfg_cls, extra)) in enumerate(specs.items()):
        model = cls(cfg_cls(**TINY, **extra)).eval()
        _randomise(torch, model, seed=i)
        folder = tmp_path_factory.mktemp(f"dinov2_{name}")
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


_FNS: dict[int, tuple] = {}


def run(model, x):
    """Forward with one jitted function per model (retraced once per input shape)."""
    if id(model) not in _FNS:
        graphdef, state = nnx.split(model)
        _FNS[id(model)] = (jax.jit(lambda s, px: nnx.merge(graphdef, s)(px)), state, model)
    fn, state, _ = _FNS[id(model)]
    return np.asarray(fn(state, jnp.asarray(x)))


@pytest.fixture(scope="module")
def ours(checkpoints):
    return {name: load_dinov2(folder) for name, (folder, _) in checkpoints.items()}


def _reference(torch, model, pixels_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
        return model(pixel_values=x).last_hidden_state.numpy()


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


CASES = {
    "plain": [(56, 56), (70, 98), (112, 112), (28, 42)],
    "registers": [(56, 56), (70, 98), (28, 42)],
    "swiglu": [(56, 56), (70, 98)],
}


@pytest.mark.parametrize("name,hw", [(n, hw) for n, hws in CASES.items() for hw in hws],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_parity(torch, checkpoints, ours, name, hw):
    _, ref_model = checkpoints[name]
    pixels = _pixels(*hw)
    ref = _reference(torch, ref_model, pixels)
    got = run(ours[name], pixels)
    err = assert_close(got, ref, what=f"{name} {hw}")
    print(f"\n[dinov2 parity] {name} {hw[0]}x{hw[1]}: max abs err {err:.2e} (max|ref| {np.abs(ref).max():.2f})")


def test_patch_tokens(torch, checkpoints, ours):
    _, ref_model = checkpoints["registers"]
    pixels = _pixels(70, 98, seed=1)
    ref = _reference(torch, ref_model, pixels)
    tokens, (h, w) = patch_tokens(ours["registers"], jnp.asarray(pixels))
    assert (h, w) == (5, 7) and tokens.shape == (2, 5, 7, 32)
    assert_close(tokens, ref[:, 1 + 4:].reshape(2, 5, 7, 32), what="patch tokens")


def test_bfloat16_runs_close(torch, checkpoints):
    folder, ref_model = checkpoints["plain"]
    model = load_dinov2(folder, param_dtype="bfloat16", dtype="bfloat16")
    assert model.layers.attention.query.kernel[...].dtype == jnp.bfloat16
    pixels = _pixels(56, 56)
    got = run(model, pixels)
    ref = _reference(torch, ref_model, pixels)
    assert np.isfinite(got).all()
    assert_close(got, ref, rel=0.1, what="bfloat16")


@pytest.mark.parametrize("antialias", [False, True])
def test_interpolation_matches_torch(torch, antialias):
    rng = np.random.default_rng(0)
    for (hi, wi), (ho, wo) in [((4, 4), (5, 7)), ((4, 4), (8, 8)), ((4, 4), (2, 3)), ((37, 37), (16, 23)),
                               ((37, 37), (74, 40)), ((5, 9), (4, 4)), ((4, 4), (1, 1)), ((6, 6), (6, 6))]:
        x = rng.standard_normal((1, 8, hi, wi)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(ho, wo), mode="bicubic",
                                              align_corners=False, antialias=antialias).numpy()
        got = resize_bicubic_torch(jnp.asarray(x[0].transpose(1, 2, 0)), (ho, wo), antialias=antialias)
        assert_close(np.asarray(got).transpose(2, 0, 1)[None], ref, rel=1e-5,
                     what=f"bicubic aa={antialias} {hi}x{wi}->{ho}x{wo}")


def test_preprocess_matches_torch(torch):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 80, 64, 3)).astype(np.float32)
    got = np.asarray(preprocess(jnp.asarray(images), 40))  # 40 -> 42 (3 patches)
    assert got.shape == (2, 42, 42, 3)
    x = torch.nn.functional.interpolate(torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(42, 42),
                                        mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = ((x - mean) / std).numpy().transpose(0, 2, 3, 1)
    assert_close(got, ref, rel=1e-5, what="preprocess")
    assert preprocess(jnp.zeros((1, 10, 10, 3)), (20, 50)).shape == (1, 14, 56, 3)


def test_presets():
    s, b, l, g = (preset(n) for n in ("vit_s14", "vit_b14", "vit_l14", "vit_g14"))
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads) == (384, 12, 6)
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads) == (768, 12, 12)
    assert (l.hidden_size, l.num_hidden_layers, l.num_attention_heads) == (1024, 24, 16)
    assert (g.hidden_size, g.num_hidden_layers, g.num_attention_heads) == (1536, 40, 24)
    assert g.use_swiglu_ffn and g.mlp_hidden == 4096 and b.mlp_hidden == 3072
    assert g.num_positions == 37 * 37 and preset("vit_b14", registers=True).num_register_tokens == 4


def test_config_from_hf(checkpoints):
    tf = _transformers()
    folder, _ = checkpoints["registers"]
    cfg = Dinov2Config.from_pretrained(folder, dtype="bfloat16")
    assert cfg.num_register_tokens == 4 and cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    giant = tf.Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                            use_swiglu_ffn=True, image_size=518)
    assert Dinov2Config.from_dict(giant.to_dict()) == preset("vit_g14")


def _edited_copy(src_folder, dst, edit):
    shutil.copytree(src_folder, dst)
    tensors = {k: np.array(v) for k, v in SafetensorsFile(dst / "model.safetensors").items()}
    edit(tensors)
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


@pytest.mark.parametrize("case", ["missing", "unexpected", "wrong_shape", "wrong_shape_layer"])
def test_checkpoint_errors(checkpoints, tmp_path, case):
    folder, _ = checkpoints["plain"]
    key = {
        "missing": "encoder.layer.1.attention.attention.value.bias",
        "unexpected": "encoder.layer.0.attention.extra.weight",
        "wrong_shape": "layernorm.weight",
        "wrong_shape_layer": "encoder.layer.1.mlp.fc1.weight",
    }[case]

    def edit(t):
        if case == "missing":
            del t[key]
        elif case == "unexpected":
            t[key] = np.zeros((2, 2), np.float32)
        elif case == "wrong_shape":
            t[key] = np.ones((33,), np.float32)
        else:
            t[key] = t[key][:64]

    bad = _edited_copy(folder, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_dinov2(bad)


def test_missing_config(checkpoints, tmp_path):
    folder, _ = checkpoints["plain"]
    shutil.copytree(folder, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_dinov2(tmp_path / "noconfig")


def test_config_mismatch_is_an_error(checkpoints, tmp_path):
    """A registers checkpoint with its num_register_tokens removed from config.json fails loudly."""
    folder, _ = checkpoints["registers"]
    shutil.copytree(folder, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg.pop("num_register_tokens")
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="register_tokens"):
        load_dinov2(tmp_path / "c")
