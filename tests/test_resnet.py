"""ResNet parity against transformers' ResNetModel / ResNetForImageClassification (tiny random
configs with randomised BatchNorm statistics, saved with save_pretrained), stage selection and
feature grids, preprocessing, presets at full size, and strict-loading errors."""

from __future__ import annotations

import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.resnet import ResNetConfig, ResNetModel, feature_grid, preprocess, preset, stage_features
from vipo_jax.models.resnet import from_pretrained as load_resnet
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

VOCAB = {None, "layers", "embed", "heads", "mlp", "vocab", "conv_in", "conv_out", "norm"}


def _transformers():
    # transformers imports torchvision, whose fake-op registrations fail against the CPU torch
    # wheel; we never use those ops (same workaround as tests/conftest.py).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


# name: (transformers class, ResNetConfig kwargs). Depth 2 stages exercise the stacked layers;
# "basic" has no shortcut in its first stage (embedding_size == hidden_sizes[0], stride 1);
# "downsample" has both downsampling switches and a GELU hidden_act (the inner convs stay ReLU).
SPECS = {
    "bottleneck": ("ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 2],
                                       layer_type="bottleneck")),
    "basic": ("ResNetForImageClassification", dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32],
                                                   depths=[2, 1, 2, 1], layer_type="basic", num_labels=5)),
    "downsample": ("ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[2, 1, 1, 1],
                                       layer_type="bottleneck", downsample_in_first_stage=True,
                                       downsample_in_bottleneck=True, hidden_act="gelu")),
}


def _randomise(torch, model, seed):
    """BatchNorm weights / biases / running statistics far from the identity (so a mis-mapped or
    un-folded norm shows), random classifier head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.3 + 1.4 * torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(1000)
        for name, p in model.named_parameters():
            if "normalization.weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "normalization.bias" in name or name.startswith("classifier"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def checkpoints(torch, tmp_path_factory):
    """{name: (folder, torch base model)}."""
    tf = _transformers()
    out = {}
    for i, (name, (cls_name, kw)) in enumerate(SPECS.items()):
        model = getattr(tf, cls_name)(tf.ResNetConfig(**kw)).eval()
        _randomise(torch, model, seed=i)
        folder = tmp_path_factory.mktemp(f"resnet_{name}")
        model.save_pretrained(folder)
        out[name] = (folder, model.resnet if cls_name == "ResNetForImageClassification" else model)
    return out


@pytest.fixture(scope="module")
def ours(checkpoints):
    return {name: load_resnet(folder) for name, (folder, _) in checkpoints.items()}


_FNS: dict[int, tuple] = {}


def hidden_states(model, x):
    """All feature maps with one jitted function per model (retraced once per input shape)."""
    if id(model) not in _FNS:
        graphdef, state = nnx.split(model)
        _FNS[id(model)] = (jax.jit(lambda s, px: nnx.merge(graphdef, s).hidden_states(px)), state, model)
    fn, state, _ = _FNS[id(model)]
    return [np.asarray(h) for h in fn(state, jnp.asarray(x))]


def _reference(torch, model, pixels_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
        out = model(pixel_values=x, output_hidden_states=True)
    return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states], out.last_hidden_state.numpy()


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


CASES = [("bottleneck", (64, 64)), ("bottleneck", (37, 50)), ("basic", (45, 64)), ("downsample", (64, 48))]


@pytest.mark.parametrize("name,hw", CASES, ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_parity(torch, checkpoints, ours, name, hw):
    """Every feature map (stem, stage1..4) matches transformers' hidden_states."""
    _, ref_model = checkpoints[name]
    pixels = _pixels(*hw)
    refs, last = _reference(torch, ref_model, pixels)
    got = hidden_states(ours[name], pixels)
    assert len(got) == len(refs) == 5
    np.testing.assert_array_equal(refs[-1], last.transpose(0, 2, 3, 1))
    cfg = ours[name].config
    for i, (g, r) in enumerate(zip(got, refs)):
        assert g.shape == (2, *cfg.feature_grid(hw, i)), (i, g.shape)
        err = assert_close(g, r, what=f"{name} {hw} {cfg.stage_names[i]}")
        print(f"\n[resnet parity] {name} {hw[0]}x{hw[1]} {cfg.stage_names[i]}: max abs err {err:.2e} "
              f"(max|ref| {np.abs(r).max():.2f})")


def test_stage_selection(torch, checkpoints, ours):
    model = ours["bottleneck"]
    pixels = _pixels(64, 64, seed=1)
    refs, _ = _reference(torch, checkpoints["bottleneck"][1], pixels)
    stage3 = jax.jit(lambda x: stage_features(model, x, "stage3"))(jnp.asarray(pixels))
    assert stage3.shape == (2, 4, 4, 16) == (2, *feature_grid(model.config, 64, "stage3"))
    assert_close(stage3, refs[3], what="stage3")
    assert model.config.stage_index("stem") == 0 and model.config.stage_index(-1) == 4
    assert model.config.stage_index(None) == 4 and model.config.stage_index(2) == 2
    assert len(model.hidden_states(jnp.asarray(pixels[:1]), "stage1")) == 2
    with pytest.raises(ConfigError, match="unknown stage"):
        model(jnp.asarray(pixels), stage="stage5")
    with pytest.raises(ConfigError, match="out of range"):
        model.config.stage_index(5)
    with pytest.raises(ValueError, match="expected pixels"):
        model(jnp.zeros((1, 32, 32, 4)))


def test_batchnorm_is_folded(checkpoints, ours):
    """The norms are per-channel scale / shift parameters (no running statistics in the model)."""
    _, ref = checkpoints["bottleneck"]
    bn = ref.embedder.embedder.normalization
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().numpy()
    shift = (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()).detach().numpy()
    norm = ours["bottleneck"].embedder.norm
    np.testing.assert_allclose(np.asarray(norm.scale[...]), scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(norm.bias[...]), shift, rtol=1e-5, atol=1e-7)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours["bottleneck"]))}
    assert not any("running" in n or "batches" in n for n in names)
    assert "stages.1.rest.conv2.norm.scale" in names and "stages.1.first.shortcut.conv.kernel" in names


def test_bfloat16_runs_close(torch, checkpoints):
    folder, ref_model = checkpoints["bottleneck"]
    model = load_resnet(folder, param_dtype="bfloat16", dtype="bfloat16")
    assert model.stages[1].rest.conv2.conv.kernel[...].dtype == jnp.bfloat16
    pixels = _pixels(64, 64)
    got = jax.jit(lambda x: model(x))(jnp.asarray(pixels))
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    refs, _ = _reference(torch, ref_model, pixels)
    assert_close(np.asarray(got, np.float32), refs[-1], rel=0.1, what="bfloat16")


def test_remat_matches(checkpoints, ours):
    folder, _ = checkpoints["basic"]
    model = load_resnet(folder, remat="full")
    pixels = _pixels(45, 64, seed=2)
    assert_close(jax.jit(lambda x: model(x))(jnp.asarray(pixels)), hidden_states(ours["basic"], pixels)[-1], rel=1e-6)


def test_preprocess_matches_torch(torch):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 80, 64, 3)).astype(np.float32)
    got = np.asarray(preprocess(jnp.asarray(images), 48))
    x = torch.nn.functional.interpolate(torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(48, 48),
                                        mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert_close(got, ((x - mean) / std).numpy().transpose(0, 2, 3, 1), rel=1e-5, what="preprocess")
    same = np.asarray(preprocess(jnp.asarray(images)))
    assert same.shape == images.shape
    assert_close(same, (images - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rel=1e-5)
    assert preprocess(jnp.zeros((1, 10, 10, 3)), (20, 30)).shape == (1, 20, 30, 3)


def _logical_names_ok(model):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (name, names)
        assert set(names) <= VOCAB, (name, names)
        assert (names[0] == "layers") == (".rest." in name), (name, names)


def test_logical_axis_names(ours):
    for model in ours.values():
        _logical_names_ok(model)
    m = ours["bottleneck"]
    assert m.embedder.conv.kernel.get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")
    assert m.stages[1].rest.conv1.conv.kernel.get_metadata()["out_sharding"] == (
        "layers", None, None, "conv_in", "conv_out")
    assert m.stages[0].first.conv1.norm.scale.get_metadata()["out_sharding"] == ("norm",)


def _count(model):
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model)))


def test_presets_full_size(torch):
    """resnet-50 built abstractly has exactly the parameters of transformers' ResNetModel (BatchNorm
    weight + bias per norm; running statistics are folded, not stored)."""
    tf = _transformers()
    cfg = preset("microsoft/resnet-50")
    assert cfg == ResNetConfig.from_dict(tf.ResNetConfig().to_dict())  # transformers' defaults are resnet-50
    model = nnx.eval_shape(lambda: ResNetModel(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = tf.ResNetModel(tf.ResNetConfig())
    assert _count(model) == sum(p.numel() for p in ref.parameters()) == 23_508_032
    _logical_names_ok(model)
    assert cfg.feature_grid(224) == (7, 7, 2048)
    assert cfg.feature_grid(512, "stage3") == (32, 32, 1024) and cfg.feature_grid((512, 768), "stem") == (128, 192, 64)
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, "stage3"), state,
                         jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32))
    assert out.shape == (2, 32, 32, 1024)
    r18 = preset("resnet-18")
    assert r18.layer_type == "basic" and r18.feature_grid(224) == (7, 7, 512)
    with pytest.raises(ConfigError, match="unknown ResNet preset"):
        preset("resnet-51")
    with pytest.raises(ConfigError, match="unknown option"):
        preset("resnet-50", width=3)


def test_config_from_hf(checkpoints):
    folder, _ = checkpoints["downsample"]
    cfg = ResNetConfig.from_pretrained(folder, dtype="bfloat16", remat="full")
    assert cfg.downsample_in_first_stage and cfg.downsample_in_bottleneck and cfg.hidden_act == "gelu"
    assert cfg.depths == (2, 1, 1, 1) and cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    with pytest.raises(ConfigError, match="layer_type"):
        ResNetConfig(layer_type="preact")


def _edited_copy(src_folder, dst, edit):
    shutil.copytree(src_folder, dst)
    tensors = {k: np.array(v) for k, v in SafetensorsFile(dst / "model.safetensors").items()}
    edit(tensors)
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


ERRORS = {  # case: (checkpoint, key)
    "missing": ("bottleneck", "encoder.stages.2.layers.0.layer.1.normalization.running_var"),
    "unexpected": ("bottleneck", "encoder.stages.0.layers.0.extra.weight"),
    "wrong_shape": ("bottleneck", "embedder.embedder.normalization.weight"),
    "wrong_shape_stacked": ("bottleneck", "encoder.stages.1.layers.1.layer.1.convolution.weight"),
    "missing_with_head": ("basic", "resnet.encoder.stages.0.layers.1.layer.0.convolution.weight"),
    "unexpected_with_head": ("basic", "resnet.pooler.weight"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_checkpoint_errors(checkpoints, tmp_path, case):
    name, key = ERRORS[case]
    folder, _ = checkpoints[name]

    def edit(t):
        if case.startswith("missing"):
            del t[key]
        elif case.startswith("unexpected"):
            t[key] = np.zeros((2, 2), np.float32)
        elif case == "wrong_shape":
            t[key] = np.ones((9,), np.float32)
        else:
            t[key] = t[key][:, :2]

    bad = _edited_copy(folder, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_resnet(bad)


def test_classifier_head_is_dropped_and_counters_optional(checkpoints, ours, tmp_path):
    folder, _ = checkpoints["basic"]
    keys = set(SafetensorsFile(folder / "model.safetensors").keys())
    assert {"classifier.1.weight", "classifier.1.bias"} <= keys
    assert any(k.endswith("num_batches_tracked") for k in keys)

    def drop_counters(t):
        for k in [k for k in t if k.endswith("num_batches_tracked")]:
            del t[k]

    stripped = load_resnet(_edited_copy(folder, tmp_path / "nocounters", drop_counters))
    a = nnx.to_flat_state(nnx.state(stripped))
    b = dict(nnx.to_flat_state(nnx.state(ours["basic"])))
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(b[path].get_value()))


def test_missing_config(checkpoints, tmp_path):
    folder, _ = checkpoints["bottleneck"]
    shutil.copytree(folder, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_resnet(tmp_path / "noconfig")
