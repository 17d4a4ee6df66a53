"""FLUX.1 DiT port: parity with diffusers' FluxTransformer2DModel (diffusers and BFL layouts),
mixed precision, remat, latent packing, and strict-loading errors."""

from __future__ import annotations

import functools
import inspect
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
from vipo_jax.models.flux import FluxConfig, latent_image_ids, pack_latents, text_ids, unpack_latents
from vipo_jax.models.flux import from_pretrained as load_flux_transformer
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

pytestmark = pytest.mark.torch

TINY = dict(patch_size=1, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
B, N_TXT, LAT_C, LAT_H, LAT_W = 2, 5, 4, 8, 12  # 8x12 latent -> 4x6 = 24 tokens


def _diffusers():
    # torchvision's compiled fake-op registrations do not match the pinned CPU torch; diffusers
    # never uses those ops (see tests.utils.import_open_clip).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import diffusers

    return diffusers


# ---------------------------------------------------------------------------------------------
# Reference models and inputs (built once per module).


def _make_reference(torch, tmp_path_factory, name, **cfg):
    diffusers = _diffusers()
    torch.manual_seed(len(name))
    model = diffusers.FluxTransformer2DModel(**TINY, **cfg).eval()
    with torch.no_grad():  # non-trivial RMSNorm scales so that q/k norm mapping is exercised
        for n, p in model.named_parameters():
            if "norm_" in n and n.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _inputs(in_channels: int, guidance: bool, seed: int):
    rng = np.random.default_rng(seed)
    c = in_channels // 4
    latents = rng.standard_normal((B, c, LAT_H, LAT_W)).astype(np.float32)
    return dict(
        img=np.array(pack_latents(latents)),
        txt=rng.standard_normal((B, N_TXT, TINY["joint_attention_dim"])).astype(np.float32),
        pooled=rng.standard_normal((B, TINY["pooled_projection_dim"])).astype(np.float32),
        timestep=np.array([0.3, 0.9], np.float32),
        img_ids=np.array(latent_image_ids(LAT_H, LAT_W)),
        txt_ids=np.array(text_ids(N_TXT)),
        guidance=np.array([3.5, 1.0], np.float32) if guidance else None,
    )


def _reference_output(torch, model, x):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x["img"]),
            encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["pooled"]),
            timestep=torch.from_numpy(x["timestep"]),
            img_ids=torch.from_numpy(x["img_ids"]),
            txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=None if x["guidance"] is None else torch.from_numpy(x["guidance"]),
            return_dict=False,
        )[0]
    return out.numpy()


@pytest.fixture(scope="module")
def dev(torch, tmp_path_factory):
    model, folder = _make_reference(torch, tmp_path_factory, "flux_dev", in_channels=16, guidance_embeds=True)
    x = _inputs(16, True, seed=1)
    return dict(model=model, folder=folder, x=x, ref=_reference_output(torch, model, x))


@pytest.fixture(scope="module")
def schnell(torch, tmp_path_factory):
    model, folder = _make_reference(torch, tmp_path_factory, "flux_schnell", in_channels=64,
                                    guidance_embeds=False)
    x = _inputs(64, False, seed=2)
    return dict(model=model, folder=folder, x=x, ref=_reference_output(torch, model, x))


# ---------------------------------------------------------------------------------------------
# Jitted forward / gradient, shared by all tests (graphdef static: equal configs share a compile).


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(**x)


def run(model, x, batched_ids: bool = False):
    x = {k: (None if v is None else jnp.asarray(v)) for k, v in x.items()}
    if batched_ids:
        x["img_ids"] = jnp.broadcast_to(x["img_ids"], (B, *x["img_ids"].shape))
        x["txt_ids"] = jnp.broadcast_to(x["txt_ids"], (B, *x["txt_ids"].shape))
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, x))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grad(graphdef, state, x):
    def loss(s):
        v = nnx.merge(graphdef, s)(**x)
        return jnp.mean(jnp.square(v - x["img"]))

    return jax.value_and_grad(loss)(state)


# ---------------------------------------------------------------------------------------------
# BFL layout, built by inverting diffusers' convert_flux_transformer_checkpoint_to_diffusers.


def diffusers_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """Inverse of diffusers' BFL -> diffusers key mapping (numpy arrays, torch layout)."""
    sd = {k: np.asarray(v) for k, v in sd.items()}
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def cat(dst, srcs):
        out[f"{dst}.weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs], axis=0)
        out[f"{dst}.bias"] = np.concatenate([sd[f"{s}.bias"] for s in srcs], axis=0)

    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{ours}.linear_1.weight" in sd:
            lin(f"{bfl}.in_layer", f"time_text_embed.{ours}.linear_1")
            lin(f"{bfl}.out_layer", f"time_text_embed.{ours}.linear_2")
    lin("txt_in", "context_embedder")
    lin("img_in", "x_embedder")
    for i in range(num_layers):
        s, t = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(t + "img_mod.lin", s + "norm1.linear")
        lin(t + "txt_mod.lin", s + "norm1_context.linear")
        cat(t + "img_attn.qkv", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"])
        cat(t + "txt_attn.qkv", [s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"])
        out[t + "img_attn.norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[t + "img_attn.norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
        out[t + "txt_attn.norm.query_norm.scale"] = sd[s + "attn.norm_added_q.weight"]
        out[t + "txt_attn.norm.key_norm.scale"] = sd[s + "attn.norm_added_k.weight"]
        lin(t + "img_mlp.0", s + "ff.net.0.proj")
        lin(t + "img_mlp.2", s + "ff.net.2")
        lin(t + "txt_mlp.0", s + "ff_context.net.0.proj")
        lin(t + "txt_mlp.2", s + "ff_context.net.2")
        lin(t + "img_attn.proj", s + "attn.to_out.0")
        lin(t + "txt_attn.proj", s + "attn.to_add_out")
    for i in range(num_single_layers):
        s, t = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        lin(t + "modulation.lin", s + "norm.linear")
        cat(t + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
        out[t + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[t + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
        lin(t + "linear2", s + "proj_out")
    lin("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # diffusers (scale, shift) -> BFL (shift, scale)
        scale, shift = np.split(sd[f"norm_out.linear.{p}"], 2, axis=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([shift, scale], axis=0)
    return out


def _diffusers_bfl_converter(inner_dim: int):
    """diffusers' own BFL converter, whose source hard-codes FLUX.1's ``inner_dim = 3072`` (used
    only to split ``linear1``): re-executed with the tiny model's width."""
    from diffusers.loaders import single_file_utils

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1
    namespace = dict(vars(single_file_utils))
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), "<flux_convert>", "exec"),
         namespace)
    return namespace[fn.__name__]


@pytest.fixture(scope="module")
def bfl_file(torch, dev, tmp_path_factory):
    sd = dev["model"].state_dict()
    bfl = diffusers_to_bfl(sd, TINY["num_layers"], TINY["num_single_layers"])
    # The inverse is right iff diffusers' converter maps it back to the same state dict.
    convert = _diffusers_bfl_converter(TINY["num_attention_heads"] * TINY["attention_head_dim"])
    back = convert({k: torch.from_numpy(v.copy()) for k, v in bfl.items()})
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    path = tmp_path_factory.mktemp("flux_bfl") / "flux1-tiny-dev.safetensors"
    save_safetensors(path, bfl)
    return path


# ---------------------------------------------------------------------------------------------
# Parity.


def test_dev_parity_diffusers_layout(dev):
    model = load_flux_transformer(dev["folder"])
    assert model.cfg.guidance_embeds and model.cfg.in_channels == 16
    assert model.transformer_blocks.img_attn.qkv.kernel.shape == (2, 32, 96)
    out = run(model, dev["x"], batched_ids=True)
    err = assert_close(out, dev["ref"], what="flux dev (diffusers layout)")
    print(f"dev diffusers-layout max abs err {err:.2e} (max|ref| {np.abs(dev['ref']).max():.2f})")
    with pytest.raises(ValueError, match="guidance"):
        model(**{**{k: jnp.asarray(v) for k, v in dev["x"].items()}, "guidance": None})


def test_sharded_folder_and_pipeline_root(dev, tmp_path):
    """A sharded diffusers checkpoint (index.json) under a pipeline root's ``transformer/``."""
    dev["model"].save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = load_flux_transformer(tmp_path, dtype=jnp.bfloat16)
    assert sharded.cfg.dtype == "bfloat16"
    want = dict(nnx.to_flat_state(nnx.state(load_flux_transformer(dev["folder"]))))
    got = nnx.to_flat_state(nnx.state(sharded))
    assert len(want) == len(got)
    for path, var in got:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[path].get_value()))


def test_schnell_parity_diffusers_layout(schnell):
    model = load_flux_transformer(schnell["folder"])
    assert not model.cfg.guidance_embeds and model.time_text_embed.guidance_embedder is None
    out = run(model, schnell["x"])
    err = assert_close(out, schnell["ref"], what="flux schnell (diffusers layout)")
    print(f"schnell diffusers-layout max abs err {err:.2e} (max|ref| {np.abs(schnell['ref']).max():.2f})")
    with pytest.raises(ValueError, match="guidance"):
        model(**{**{k: jnp.asarray(v) for k, v in schnell["x"].items() if v is not None},
                 "guidance": jnp.ones((B,))})


def test_dev_parity_bfl_layout(dev, bfl_file):
    # guidance_embeds comes from the file (guidance_in.* present) whatever the given config says.
    cfg = FluxConfig(in_channels=16, guidance_embeds=False, **TINY)
    model = load_flux_transformer(bfl_file, config=cfg)
    assert model.cfg.guidance_embeds
    out = run(model, dev["x"], batched_ids=True)
    err = assert_close(out, dev["ref"], what="flux dev (BFL layout)")
    print(f"dev BFL-layout max abs err {err:.2e}")


def test_bfl_prefixed_schnell_matches_diffusers_layout(schnell, tmp_path):
    """A schnell BFL file with the ``model.diffusion_model.`` prefix of full checkpoints, plus an
    unrelated VAE key, loads to exactly the weights of the diffusers folder."""
    bfl = diffusers_to_bfl(schnell["model"].state_dict(), TINY["num_layers"], TINY["num_single_layers"])
    assert not any(k.startswith("guidance_in") for k in bfl)
    tensors = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = np.zeros((2, 2), np.float32)
    save_safetensors(tmp_path / "full.safetensors", tensors)
    cfg = FluxConfig(in_channels=64, guidance_embeds=True, **TINY)
    ours = load_flux_transformer(tmp_path / "full.safetensors", config=cfg)
    assert not ours.cfg.guidance_embeds
    want = nnx.to_flat_state(nnx.state(load_flux_transformer(schnell["folder"])))
    got = dict(nnx.to_flat_state(nnx.state(ours)))
    assert len(want) == len(got)
    for path, var in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()),
                                      err_msg=str(path))


def test_bf16_compute_and_bf16_params(dev):
    ref = dev["ref"]
    mixed = load_flux_transformer(dev["folder"], dtype="bfloat16")
    assert mixed.x_embedder.kernel.dtype == jnp.float32
    out = run(mixed, dev["x"])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err_mixed = assert_close(out, ref, rel=5e-2, what="fp32 params + bf16 compute")

    pure = load_flux_transformer(dev["folder"], param_dtype="bfloat16", dtype="bfloat16")
    assert pure.transformer_blocks.img_attn.qkv.kernel.dtype == jnp.bfloat16
    assert pure.transformer_blocks.img_attn.norm_q.scale.dtype == jnp.bfloat16
    out = run(pure, dev["x"])
    err_pure = assert_close(out, ref, rel=5e-2, what="bf16 params + bf16 compute")
    print(f"bf16 max abs err: mixed {err_mixed:.2e}, pure {err_pure:.2e} (max|ref| {np.abs(ref).max():.2f})")


def test_remat_full_matches_none(dev):
    x = {k: jnp.asarray(v) for k, v in dev["x"].items()}
    results = {}
    for remat in ("none", "full"):
        model = load_flux_transformer(dev["folder"], remat=remat)
        graphdef, state = nnx.split(model)
        results[remat] = _loss_and_grad(graphdef, state, x)
    (l0, g0), (l1, g1) = results["none"], results["full"]
    assert_close(l1, l0, rel=1e-6, what="loss")
    flat0 = dict(nnx.to_flat_state(g0))
    for path, var in nnx.to_flat_state(g1):
        g_ref = np.asarray(flat0[path].get_value())
        assert np.abs(g_ref).max() > 0, path
        assert_close(var.get_value(), g_ref, rel=1e-5, what=f"grad {'.'.join(map(str, path))}")


# ---------------------------------------------------------------------------------------------
# Packing.


def test_packing_matches_diffusers_pipeline(torch):
    diffusers = _diffusers()
    pipe = diffusers.FluxPipeline
    z = np.random.default_rng(0).standard_normal((B, LAT_C, LAT_H, LAT_W)).astype(np.float32)
    tokens = np.asarray(pack_latents(z))
    ref = pipe._pack_latents(torch.from_numpy(z), B, LAT_C, LAT_H, LAT_W).numpy()
    np.testing.assert_array_equal(tokens, ref)
    back = np.asarray(unpack_latents(tokens, LAT_H, LAT_W))
    np.testing.assert_array_equal(back, z)
    vae_scale = 8  # diffusers' unpack takes pixel sizes
    ref_back = pipe._unpack_latents(torch.from_numpy(ref), LAT_H * vae_scale, LAT_W * vae_scale, vae_scale)
    np.testing.assert_array_equal(back, ref_back.numpy())
    ids = np.asarray(latent_image_ids(LAT_H, LAT_W))
    ref_ids = pipe._prepare_latent_image_ids(B, LAT_H // 2, LAT_W // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(np.asarray(text_ids(7)), np.zeros((7, 3), np.float32))
    with pytest.raises(ValueError):
        pack_latents(np.zeros((1, 4, 7, 8), np.float32))


# ---------------------------------------------------------------------------------------------
# Strict loading errors.


def _tampered_folder(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    f = SafetensorsFile(src / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    edit(tensors)
    save_safetensors(dst / "diffusion_pytorch_model.safetensors", tensors)
    return dst


def test_missing_key(dev, tmp_path):
    key = "transformer_blocks.1.attn.add_k_proj.weight"
    folder = _tampered_folder(dev["folder"], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_flux_transformer(folder)


def test_extra_key(dev, tmp_path):
    key = "single_transformer_blocks.0.attn.to_out.0.weight"
    folder = _tampered_folder(dev["folder"], tmp_path / "e",
                              lambda t: t.__setitem__(key, np.zeros((32, 32), np.float32)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_flux_transformer(folder)


def test_wrong_shape(dev, tmp_path):
    key = "single_transformer_blocks.1.proj_mlp.weight"
    folder = _tampered_folder(dev["folder"], tmp_path / "s",
                              lambda t: t.__setitem__(key, np.zeros((128, 31), np.float32)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_flux_transformer(folder)


def test_wrong_shape_bfl(bfl_file, tmp_path):
    f = SafetensorsFile(bfl_file)
    tensors = {k: np.array(f[k]) for k in f}
    tensors["single_blocks.0.linear1.weight"] = tensors["single_blocks.0.linear1.weight"][:-1]
    save_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"single_blocks\.0\.linear1\.weight"):
        load_flux_transformer(tmp_path / "bad.safetensors", config=FluxConfig(in_channels=16, **TINY))


def test_missing_config(dev, tmp_path):
    shutil.copy(dev["folder"] / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_flux_transformer(tmp_path)


def test_config_roundtrip(dev):
    cfg = FluxConfig.from_pretrained(dev["folder"], remat="full")
    d = json.loads((dev["folder"] / "config.json").read_text())
    assert cfg.axes_dims_rope == tuple(d["axes_dims_rope"]) and cfg.remat == "full"
    assert cfg.joint_attention_dim == d["joint_attention_dim"]
