"""Wan2.1 T2V DiT port: parity with diffusers' WanTransformer3DModel saved at a tiny size (1, 2 and
3 latent frames, non-square frames, batch 2, zero-padded text), sharded checkpoints, mixed
precision, remat, logical axis names, and strict-loading / config errors."""

from __future__ import annotations

import dataclasses
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
from vipo_jax.models.wan import PRESETS, WanConfig, WanTransformer, preset
from vipo_jax.models.wan import from_pretrained as load_wan_transformer
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

# head_dim 32 splits its 16 rotary pairs unevenly over (frames, height, width): (6, 5, 5).
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=6,
            text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, rope_max_seq_len=32)
B, LAT_H, LAT_W, N_TXT = 2, 6, 10, 12  # 6x10 latent -> 3x5 tokens per latent frame
PROMPT_LENS = (5, 12)
VOCAB = {"layers", "embed", "heads", "mlp", "vocab", "conv_in", "conv_out", "norm", None}


@pytest.fixture(scope="module")
def ref(torch, tmp_path_factory):
    """The tiny reference model (non-trivial norm weights) saved with diffusers' save_pretrained."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("wan_tiny")
    model.save_pretrained(folder, safe_serialization=True)
    return dict(model=model, folder=folder)


@pytest.fixture(scope="module")
def ours(ref):
    return load_wan_transformer(ref["folder"])


def _inputs(frames: int, seed: int):
    """Channels-last latents, (B,) timesteps, and text whose padding is garbage for us (with a
    mask) and zeros for the reference, as WanPipeline builds it."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((B, frames, LAT_H, LAT_W, TINY["in_channels"])).astype(np.float32)
    timestep = rng.uniform(0, 1000, (B,)).astype(np.float32)
    text = rng.standard_normal((B, N_TXT, TINY["text_dim"])).astype(np.float32)
    mask = (np.arange(N_TXT)[None] < np.array(PROMPT_LENS)[:, None]).astype(np.int32)
    padded = np.where(mask[..., None] > 0, text, 0.0).astype(np.float32)
    return dict(latents=latents, timestep=timestep, text=text, mask=mask, padded=padded)


def _reference(torch, model, x) -> np.ndarray:
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x["latents"].transpose(0, 4, 1, 2, 3).copy()),
                    timestep=torch.from_numpy(x["timestep"]),
                    encoder_hidden_states=torch.from_numpy(x["padded"]), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, latents, timestep, text, mask):
    return nnx.merge(graphdef, state)(latents, timestep, text, mask)


def run(model, latents, timestep, text, mask=None) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(text),
                               None if mask is None else jnp.asarray(mask)))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grad(graphdef, state, latents, timestep, text):
    def loss(s):
        v = nnx.merge(graphdef, s)(latents, timestep, text)
        return jnp.mean(jnp.square(v[..., : latents.shape[-1]] - latents))

    return jax.value_and_grad(loss)(state)


# ---------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_parity(torch, ref, ours, frames):
    """1, 2 and 3 latent frames (1, 5 and 9 video frames), 6x10 latents, batch 2, random timesteps;
    the text padding is removed by the mask, exactly as the pipeline's zero padding."""
    x = _inputs(frames, seed=frames)
    want = _reference(torch, ref["model"], x)
    got = run(ours, x["latents"], x["timestep"], x["text"], x["mask"])
    assert got.dtype == np.float32 and got.shape == (B, frames, LAT_H, LAT_W, TINY["out_channels"])
    err = assert_close(got, want, what=f"wan dit, {frames} latent frames")
    print(f"wan {frames} latent frame(s): max abs err {err:.2e} (max|ref| {np.abs(want).max():.2f})")


def test_padding_is_attended_not_masked(torch, ref, ours):
    """Zero padding passed as is (no mask) gives the reference too, and it matters: the padded
    tokens are attended to (dropping them changes the output)."""
    x = _inputs(2, seed=7)
    want = _reference(torch, ref["model"], x)
    got = run(ours, x["latents"], x["timestep"], x["padded"])
    err = assert_close(got, want, what="wan dit, zero-padded text without mask")
    print(f"wan zero-padded text, no mask: max abs err {err:.2e}")
    short = {**x, "padded": x["padded"][:, : PROMPT_LENS[0]]}
    assert np.abs(_reference(torch, ref["model"], short)[0] - want[0]).max() > 1e-3


def test_variant_without_cross_attn_norm(torch, tmp_path):
    """``cross_attn_norm=False`` (no ``norm2``) and a null ``out_channels`` (= in_channels)."""
    import diffusers

    torch.manual_seed(1)
    cfg = {**TINY, "num_layers": 1, "cross_attn_norm": False, "out_channels": None}
    model = diffusers.WanTransformer3DModel(**cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_wan_transformer(tmp_path)
    assert loaded.blocks.norm2 is None and loaded.cfg.out_channels is None and loaded.cfg.out_dim == 16
    x = _inputs(1, seed=5)
    want = _reference(torch, model, x)
    err = assert_close(run(loaded, x["latents"], x["timestep"], x["text"], x["mask"]), want,
                       what="wan dit without cross-attention norm")
    print(f"wan cross_attn_norm=False: max abs err {err:.2e}")


def _same_weights(a, b) -> None:
    want = dict(nnx.to_flat_state(nnx.state(b)))
    got = nnx.to_flat_state(nnx.state(a))
    assert len(want) == len(got)
    for path, var in got:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[path].get_value()))


def test_single_file_path(ref, ours):
    """A ``.safetensors`` file with its ``config.json`` beside it."""
    _same_weights(load_wan_transformer(ref["folder"] / "diffusion_pytorch_model.safetensors"), ours)


def test_sharded_index_pipeline_root(ref, ours, tmp_path):
    """A sharded checkpoint (index.json) under a pipeline root's ``transformer/``."""
    ref["model"].save_pretrained(tmp_path / "transformer", max_shard_size="30KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "transformer").glob("*-of-*.safetensors"))) > 2
    _same_weights(load_wan_transformer(tmp_path), ours)


def test_bf16_compute_and_bf16_params(torch, ref):
    x = _inputs(2, seed=11)
    want = _reference(torch, ref["model"], x)
    mixed = load_wan_transformer(ref["folder"], dtype="bfloat16")
    assert mixed.cfg.dtype == "bfloat16" and mixed.proj_out.kernel.dtype == jnp.float32
    out = run(mixed, x["latents"], x["timestep"], x["text"], x["mask"])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err_mixed = assert_close(out, want, rel=5e-2, what="fp32 params + bf16 compute")

    pure = load_wan_transformer(ref["folder"], param_dtype=jnp.bfloat16, dtype="bfloat16")
    assert pure.blocks.attn1.to_q.kernel.dtype == jnp.bfloat16
    assert pure.blocks.scale_shift_table.dtype == jnp.bfloat16
    out = run(pure, x["latents"], x["timestep"], x["text"], x["mask"])
    err_pure = assert_close(out, want, rel=5e-2, what="bf16 params + bf16 compute")
    print(f"wan bf16 max abs err: mixed {err_mixed:.2e}, pure {err_pure:.2e} (max|ref| {np.abs(want).max():.2f})")


def test_remat_full_matches_none(ref):
    x = _inputs(2, seed=3)
    args = [jnp.asarray(x[k]) for k in ("latents", "timestep", "padded")]
    results = {}
    for remat in ("none", "full"):
        graphdef, state = nnx.split(load_wan_transformer(ref["folder"], remat=remat))
        results[remat] = _loss_and_grad(graphdef, state, *args)
    (l0, g0), (l1, g1) = results["none"], results["full"]
    assert_close(l1, l0, rel=1e-6, what="loss")
    flat0 = dict(nnx.to_flat_state(g0))
    for path, var in nnx.to_flat_state(g1):
        g_ref = np.asarray(flat0[path].get_value())
        assert np.abs(g_ref).max() > 0, path
        assert_close(var.get_value(), g_ref, rel=1e-5, what=f"grad {'.'.join(map(str, path))}")


# ---------------------------------------------------------------------------------------------
# Config, presets, axis names.


def test_defaults_match_diffusers(ref):
    """Every architecture field and default is diffusers' ``WanTransformer3DModel.__init__``'s."""
    import diffusers

    sig = inspect.signature(diffusers.WanTransformer3DModel.__init__).parameters
    arch = [f for f in dataclasses.fields(WanConfig) if f.name not in ("param_dtype", "dtype", "remat", "attention")]
    assert {f.name for f in arch} == set(sig) - {"self"}
    for f in arch:
        want = sig[f.name].default
        assert f.default == (tuple(want) if isinstance(want, list | tuple) else want), f.name
    cfg = WanConfig.from_pretrained(ref["folder"], remat="full")
    saved = json.loads((ref["folder"] / "config.json").read_text())
    assert cfg.patch_size == tuple(saved["patch_size"]) and cfg.remat == "full" and cfg.ffn_dim == 96


def test_presets():
    small, big = preset("wan2.1-t2v-1.3b"), PRESETS["wan2.1-t2v-14b"]
    assert (small.num_layers, small.num_attention_heads, small.inner_dim, small.ffn_dim) == (30, 12, 1536, 8960)
    assert (big.num_layers, big.num_attention_heads, big.inner_dim, big.ffn_dim) == (40, 40, 5120, 13824)
    for cfg in (small, big):
        assert (cfg.in_channels, cfg.out_channels, cfg.text_dim, cfg.freq_dim, cfg.eps) == (16, 16, 4096, 256, 1e-6)
        assert cfg.rope_max_seq_len == 1024 and cfg.patch_size == (1, 2, 2) and cfg.rope_axes_dims == (44, 42, 42)

    def count(cfg):
        model = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model)))

    assert round(count(small) / 1e9, 2) == 1.42 and round(count(big) / 1e9, 2) == 14.29
    assert preset("wan2.1-t2v-1.3b", dtype="bfloat16", remat=None).dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown Wan preset"):
        preset("wan2.2-ti2v-5b")
    with pytest.raises(ConfigError, match="unknown option"):
        preset("wan2.1-t2v-1.3b", num_heads=3)


def test_logical_axis_names(ours):
    """Every parameter carries one logical name per dimension, from PORTING.md's vocabulary."""
    for path, var in nnx.to_flat_state(nnx.state(ours)):
        names = var.get_metadata().get("out_sharding")
        name = ".".join(map(str, path))
        assert names is not None and len(names) == var.get_value().ndim, (name, names)
        assert set(names) <= VOCAB, (name, names)
        assert (names[0] == "layers") == name.startswith("blocks."), (name, names)
    assert ours.blocks.attn1.to_q.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert ours.patch_embedding.kernel.get_metadata()["out_sharding"] == (None, None, None, "conv_in", "conv_out")


def test_input_validation(ours):
    text = np.zeros((1, 4, TINY["text_dim"]), np.float32)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(jnp.zeros((1, 1, 5, 4, 4)), jnp.zeros((1,)), jnp.asarray(text))
    with pytest.raises(ValueError, match="channels-last"):
        ours(jnp.zeros((1, 4, 2, 2, 2)), jnp.zeros((1,)), jnp.asarray(text))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours(jnp.zeros((1, 33, 2, 2, 4)), jnp.zeros((1,)), jnp.asarray(text))
    with pytest.raises(ValueError, match="timestep"):
        ours(jnp.zeros((1, 1, 2, 2, 4)), jnp.zeros((1, 1)), jnp.asarray(text))


# ---------------------------------------------------------------------------------------------
# Strict loading and config errors.


def _tampered(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    f = SafetensorsFile(src / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    if edit_tensors:
        edit_tensors(tensors)
    save_safetensors(dst / "diffusion_pytorch_model.safetensors", tensors)
    return dst


def _key_re(key: str) -> str:
    return key.replace(".", r"\.")


def test_missing_key(ref, tmp_path):
    key = "blocks.1.attn2.norm_k.weight"
    folder = _tampered(ref["folder"], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=_key_re(key)):
        load_wan_transformer(folder)


def test_unexpected_key(ref, tmp_path):
    key = "blocks.0.attn2.add_k_proj.weight"
    folder = _tampered(ref["folder"], tmp_path / "e", lambda t: t.__setitem__(key, np.zeros((64, 16), np.float32)))
    with pytest.raises(CheckpointError, match=_key_re(key)):
        load_wan_transformer(folder)
    # ... but, as in diffusers (_keys_to_ignore_on_load_unexpected), stale ``norm_added_q`` keys are dropped.
    folder = _tampered(ref["folder"], tmp_path / "q", lambda t: t.__setitem__(
        "blocks.0.attn2.norm_added_q.weight", np.ones((64,), np.float32)))
    load_wan_transformer(folder)


def test_wrong_shape(ref, tmp_path):
    key = "blocks.1.ffn.net.0.proj.weight"
    folder = _tampered(ref["folder"], tmp_path / "s", lambda t: t.__setitem__(key, np.zeros((95, 64), np.float32)))
    with pytest.raises(CheckpointError, match=_key_re(key)):
        load_wan_transformer(folder)


def test_config_of_another_class(ref, tmp_path):
    folder = _tampered(ref["folder"], tmp_path / "c",
                       edit_config=lambda c: c.__setitem__("_class_name", "WanVACETransformer3DModel"))
    with pytest.raises(CheckpointError, match="WanVACETransformer3DModel"):
        load_wan_transformer(folder)


def test_image_conditioned_config_refused(ref, tmp_path):
    folder = _tampered(ref["folder"], tmp_path / "i2v",
                       edit_config=lambda c: c.update(image_dim=1280, added_kv_proj_dim=64))
    with pytest.raises(ConfigError, match="image-conditioned"):
        load_wan_transformer(folder)
    with pytest.raises(ConfigError, match="added_kv_proj_dim"):
        WanConfig(**TINY, added_kv_proj_dim=64)


def test_missing_config(ref, tmp_path):
    shutil.copy(ref["folder"] / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_wan_transformer(tmp_path)
