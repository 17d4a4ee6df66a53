"""SAM image-encoder parity against transformers' SamModel / SamVisionModel (tiny random configs
saved with save_pretrained): neck output and pre-neck tokens, windowed (padded) and global layers in
periodic and irregular orders, preprocessing against SamImageProcessor, the full-size preset, and
strict-loading errors."""

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
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.sam import (
    SamVisionConfig,
    SamVisionEncoder,
    feature_grid,
    image_embeddings,
    preprocess,
    preprocess_size,
    preset,
)
from vipo_jax.models.sam import from_pretrained as load_sam
from vipo_jax.models.sam.model import _repeating_unit, window_partition, window_unpartition
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

VOCAB = {None, "layers", "embed", "heads", "mlp", "vocab", "conv_in", "conv_out", "norm"}

# name: (transformers class, SamVisionConfig kwargs)
SPECS = {
    # grid 8 padded to 9 for 3x3 windows; (windowed, global) x 2: the periodic (outer-scan) path
    "periodic": ("SamModel", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                  patch_size=8, output_channels=16, window_size=3, global_attn_indexes=[1, 3])),
    # grid 4 padded to 6; windowed, windowed, global, windowed: the run-by-run path; no qkv bias
    "irregular": ("SamModel", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                   patch_size=16, output_channels=16, window_size=3, global_attn_indexes=[2],
                                   qkv_bias=False, mlp_dim=48)),
    # a SamVisionModel checkpoint without position embeddings
    "vision_only": ("SamVisionModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                           patch_size=8, output_channels=8, window_size=2, global_attn_indexes=[1],
                                           use_abs_pos=False, use_rel_pos=False)),
}


def _transformers():
    # transformers imports torchvision, whose fake-op registrations fail against the CPU torch
    # wheel; we never use those ops (same workaround as tests/conftest.py).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


def _randomise(torch, model, seed):
    """Weights of a useful scale (the default init has zero position tables and unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif "pos" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module")
def checkpoints(torch, tmp_path_factory):
    """{name: (folder, torch SamVisionEncoder)}."""
    tf = _transformers()
    out = {}
    for i, (name, (cls_name, kw)) in enumerate(SPECS.items()):
        if cls_name == "SamModel":
            model = tf.SamModel(tf.SamConfig(vision_config=kw)).eval()
        else:
            model = tf.SamVisionModel(tf.SamVisionConfig(**kw)).eval()
        _randomise(torch, model, seed=i)
        folder = tmp_path_factory.mktemp(f"sam_{name}")
        model.save_pretrained(folder)
        out[name] = (folder, model.vision_encoder)
    return out


@pytest.fixture(scope="module")
def ours(checkpoints):
    return {name: load_sam(folder) for name, (folder, _) in checkpoints.items()}


_FNS: dict[int, tuple] = {}


def run(model, x):
    """(pre-neck tokens, neck output) with one jitted function per model."""
    if id(model) not in _FNS:
        graphdef, state = nnx.split(model)

        def both(s, px):
            m = nnx.merge(graphdef, s)
            tokens = m.encode(px)
            return tokens, m.neck(tokens)

        _FNS[id(model)] = (jax.jit(both), state, model)
    fn, state, _ = _FNS[id(model)]
    return tuple(np.asarray(a) for a in fn(state, jnp.asarray(x)))


def _reference(torch, encoder, pixels_nhwc):
    """(pre-neck tokens NHWC, image embeddings NHWC) of transformers' encoder."""
    seen = {}
    hook = encoder.neck.register_forward_hook(lambda mod, args, out: seen.__setitem__("tokens", args[0]))
    try:
        with torch.no_grad():
            out = encoder(torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))))
    finally:
        hook.remove()
    return seen["tokens"].numpy(), out.last_hidden_state.numpy().transpose(0, 2, 3, 1)


def _pixels(size, seed=0):
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", list(SPECS))
def test_parity(torch, checkpoints, ours, name):
    _, ref_model = checkpoints[name]
    cfg = ours[name].config
    pixels = _pixels(cfg.image_size)
    ref_tokens, ref_emb = _reference(torch, ref_model, pixels)
    tokens, emb = run(ours[name], pixels)
    assert emb.shape == (2, *feature_grid(cfg)) and tokens.shape == (2, *feature_grid(cfg, neck=False))
    e1 = assert_close(tokens, ref_tokens, what=f"{name} pre-neck tokens")
    e2 = assert_close(emb, ref_emb, what=f"{name} image embeddings")
    print(f"\n[sam parity] {name}: pre-neck max abs err {e1:.2e} (max|ref| {np.abs(ref_tokens).max():.2f}), "
          f"neck {e2:.2e} (max|ref| {np.abs(ref_emb).max():.2f})")


def test_feature_function(ours, checkpoints, torch):
    model = ours["periodic"]
    pixels = _pixels(64, seed=3)
    _, ref_emb = _reference(torch, checkpoints["periodic"][1], pixels)
    got = jax.jit(lambda x: image_embeddings(model, x))(jnp.asarray(pixels))
    assert got.shape == (2, 8, 8, 16)
    assert_close(got, ref_emb, what="image_embeddings")
    with pytest.raises(ValueError, match="expected pixels"):
        model(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ConfigError, match="64x64 inputs only"):
        feature_grid(model.config, 128)


def test_layer_runs():
    assert SamVisionConfig(**SPECS["periodic"][1]).layer_runs == ((False, 1), (True, 1)) * 2
    assert _repeating_unit(SamVisionConfig(**SPECS["periodic"][1]).layer_runs) == (((False, 1), (True, 1)), 2)
    irregular = SamVisionConfig(**SPECS["irregular"][1]).layer_runs
    assert irregular == ((False, 2), (True, 1), (False, 1)) and _repeating_unit(irregular)[1] == 1
    for name, unit in (("sam-vit-base", 2), ("sam-vit-large", 5), ("sam-vit-huge", 7)):
        assert _repeating_unit(preset(name).layer_runs) == (((False, unit), (True, 1)), 4)
    assert SamVisionConfig(num_hidden_layers=3, window_size=0).layer_runs == ((True, 3),)
    # as in transformers, indexes past the depth name no layer
    assert SamVisionConfig(num_hidden_layers=4, global_attn_indexes=(2, 5)).global_indexes == (2,)


def test_window_partition_roundtrip():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32))
    w, padded = window_partition(x, 3)
    assert w.shape == (2 * 2 * 3, 3, 3, 3) and padded == (6, 9)
    np.testing.assert_array_equal(np.asarray(w[1]), np.asarray(x[0, 0:3, 3:6]))
    np.testing.assert_array_equal(np.asarray(window_unpartition(w, 3, padded, (5, 7))), np.asarray(x))


def test_bfloat16_runs_close(torch, checkpoints):
    folder, ref_model = checkpoints["periodic"]
    model = load_sam(folder, param_dtype="bfloat16", dtype="bfloat16")
    assert model.global_layers.attn.query.kernel[...].dtype == jnp.bfloat16
    pixels = _pixels(64)
    got = jax.jit(lambda x: model(x))(jnp.asarray(pixels))
    assert np.isfinite(np.asarray(got, np.float32)).all()
    _, ref = _reference(torch, ref_model, pixels)
    assert_close(np.asarray(got, np.float32), ref, rel=0.1, what="bfloat16")


def test_remat_matches(checkpoints, ours):
    folder, _ = checkpoints["irregular"]
    model = load_sam(folder, remat="full")
    pixels = _pixels(64, seed=2)
    assert_close(jax.jit(lambda x: model(x))(jnp.asarray(pixels)), run(ours["irregular"], pixels)[1], rel=1e-6)


def test_preprocess_matches_sam_processor():
    """Within about one uint8 step of transformers' SamImageProcessor (which works on uint8 images)."""
    tf = _transformers()
    proc = tf.SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    rng = np.random.default_rng(0)
    for shape in ((80, 50, 3), (40, 40, 3), (30, 96, 3)):
        img = (rng.uniform(size=shape) * 255).astype(np.uint8)
        ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = np.asarray(preprocess(jnp.asarray(img[None] / 255.0, jnp.float32), 64))[0]
        assert got.shape == ref.shape == (64, 64, 3)
        h, w = preprocess_size(*shape[:2], 64)
        assert np.all(got[h:] == 0) and np.all(got[:, w:] == 0)
        assert np.abs(got - ref).max() < 0.03, (shape, np.abs(got - ref).max())
    assert preprocess_size(80, 50, 1024) == (1024, 640)


def _logical_names_ok(model):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (name, names)
        assert set(names) <= VOCAB, (name, names)
        assert (names[0] == "layers") == name.startswith(("windowed_layers.", "global_layers.")), (name, names)


def test_logical_axis_names(ours):
    for model in ours.values():
        _logical_names_ok(model)
    m = ours["periodic"]
    assert m.windowed_layers.attn.query.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert m.global_layers.mlp.lin2.kernel.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")
    assert m.neck.conv2.kernel.get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")
    assert m.pos_embed.get_metadata()["out_sharding"] == (None, None, None, "embed")


def _count(model):
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model)))


def test_preset_full_size(torch):
    """sam-vit-base built abstractly has exactly the parameters of transformers' image encoder."""
    tf = _transformers()
    cfg = preset("facebook/sam-vit-base")
    vision = tf.SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                global_attn_indexes=[2, 5, 8, 11])
    assert SamVisionConfig.from_dict(tf.SamConfig(vision_config=vision).to_dict()) == cfg
    model = nnx.eval_shape(lambda: SamVisionEncoder(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = tf.SamVisionModel(vision)
    assert _count(model) == sum(p.numel() for p in ref.parameters())
    _logical_names_ok(model)
    assert model.global_layers.attn.rel_pos_h.get_value().shape == (4, 127, 64)
    assert model.windowed_layers.attn.rel_pos_h.get_value().shape == (8, 27, 64)
    assert feature_grid(cfg, 1024) == (64, 64, 256) and cfg.feature_grid(neck=False) == (64, 64, 768)
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32))
    assert out.shape == (1, 64, 64, 256)
    assert preset("sam-vit-huge").hidden_size == 1280
    with pytest.raises(ConfigError, match="unknown SAM preset"):
        preset("sam-vit-tiny")
    with pytest.raises(ConfigError, match="unknown option"):
        preset("sam-vit-base", depth=3)


def test_config_from_hf(checkpoints):
    folder, _ = checkpoints["irregular"]
    cfg = SamVisionConfig.from_pretrained(folder, dtype="bfloat16")
    assert cfg.global_attn_indexes == (2,) and cfg.mlp_dim == 48 and not cfg.qkv_bias
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    assert json.loads((folder / "config.json").read_text())["vision_config"]["patch_size"] == 16
    assert SamVisionConfig.from_pretrained(checkpoints["vision_only"][0]).use_abs_pos is False
    with pytest.raises(ConfigError, match="image_size 8 < patch_size 16"):
        SamVisionConfig(image_size=8)


def _edited_copy(src_folder, dst, edit):
    shutil.copytree(src_folder, dst)
    tensors = {k: np.array(v) for k, v in SafetensorsFile(dst / "model.safetensors").items()}
    edit(tensors)
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


ERRORS = {
    "missing": "vision_encoder.layers.2.attn.rel_pos_w",
    "unexpected": "vision_encoder.layers.0.attn.extra.weight",
    "unexpected_outside_encoder": "image_head.weight",
    "wrong_shape": "vision_encoder.pos_embed",
    "wrong_shape_global_rel_pos": "vision_encoder.layers.3.attn.rel_pos_h",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_checkpoint_errors(checkpoints, tmp_path, case):
    folder, _ = checkpoints["periodic"]
    key = ERRORS[case]

    def edit(t):
        if case == "missing":
            del t[key]
        elif case.startswith("unexpected"):
            t[key] = np.zeros((2, 2), np.float32)
        else:
            t[key] = t[key][:, :-1]

    bad = _edited_copy(folder, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_sam(bad)


def test_other_parts_are_ignored(checkpoints, ours, tmp_path):
    """The prompt encoder, mask decoder and shared embedding are in the file but never read."""
    folder, _ = checkpoints["periodic"]
    keys = SafetensorsFile(folder / "model.safetensors").keys()
    parts = {k.split(".")[0] for k in keys}
    assert parts == {"vision_encoder", "prompt_encoder", "mask_decoder", "shared_image_embedding"}

    def encoder_only(t):
        for k in [k for k in t if not k.startswith("vision_encoder.")]:
            del t[k]

    slim = load_sam(_edited_copy(folder, tmp_path / "slim", encoder_only))
    full = dict(nnx.to_flat_state(nnx.state(ours["periodic"])))
    for path, var in nnx.to_flat_state(nnx.state(slim)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(full[path].get_value()))
