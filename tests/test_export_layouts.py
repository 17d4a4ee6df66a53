"""Export to other tools' layouts: diffusers folders for FLUX.1 and Wan2.1, and the BFL single file
for FLUX.1.

Tiny random diffusers models (non-trivial norm scales, so a mis-mapped norm shows) are saved by
diffusers, loaded by our loaders, exported, and loaded back by diffusers (``from_pretrained``, or
for BFL diffusers' own single-file converter with a strict ``load_state_dict``) and by our loaders:
the state dicts must be equal and the torch outputs identical. ``convert_*(to_*(model))`` must
give back our parameters exactly, so every key our converters accept is produced and no other."""

from __future__ import annotations

import inspect
import json
import sys
import types
import weakref

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.models.flux import FluxConfig, FluxTransformer, convert_bfl, latent_image_ids, text_ids
from vipo_jax.models.flux import convert_diffusers as flux_from_diffusers
from vipo_jax.models.flux import export as flux_export
from vipo_jax.models.flux import from_pretrained as load_flux_transformer
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan import convert_diffusers as wan_from_diffusers
from vipo_jax.models.wan import export as wan_export
from vipo_jax.models.wan import from_pretrained as load_wan_transformer
from vipo_jax.nn.lora import LoraConfig, add_lora
from vipo_jax.weights.safetensors_io import SafetensorsFile, open_checkpoint

pytestmark = pytest.mark.torch

FLUX_TINY = dict(patch_size=1, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
FLUX_VARIANTS = {"dev": dict(in_channels=16, guidance_embeds=True),
                 "schnell": dict(in_channels=64, guidance_embeds=False)}
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=6,
                text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, rope_max_seq_len=32)
B, N_TXT, LAT_H, LAT_W = 2, 5, 8, 12


def _diffusers():
    # torchvision's compiled fake-op registrations do not match the pinned CPU torch; diffusers
    # never uses those ops (see tests/conftest.py).
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import diffusers

    return diffusers


def _randomise_norms(torch, model) -> None:
    """Norm scales around 1 and norm biases around 0, all different, so a swapped norm shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))


def _flat(model) -> dict[str, np.ndarray]:
    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == v.dtype and g.shape == v.shape, (k, g.dtype, g.shape, v.dtype, v.shape)
        np.testing.assert_array_equal(g, v, err_msg=k)


def _assert_same_state_dict(torch, got: dict, want: dict, dtype=None) -> None:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        v = v if dtype is None else v.to(dtype)
        assert got[k].dtype == v.dtype, (k, got[k].dtype, v.dtype)
        assert torch.equal(got[k], v), k


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _arch(config) -> dict:
    """A diffusers model's config without bookkeeping, tuples as lists (as in JSON)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _config_fields_match_init(config: dict, cls) -> None:
    """config.json holds exactly ``cls.__init__``'s arguments (plus the ``_class_name`` /
    ``_diffusers_version`` bookkeeping)."""
    init = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert {k for k in config if not k.startswith("_")} == init
    assert config["_class_name"] == cls.__name__


# ---------------------------------------------------------------------------------------------
# FLUX.1.


def _flux_inputs(torch, cfg: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n_img = (LAT_H // 2) * (LAT_W // 2)
    x = dict(
        hidden_states=rng.standard_normal((B, n_img, cfg["in_channels"])),
        encoder_hidden_states=rng.standard_normal((B, N_TXT, FLUX_TINY["joint_attention_dim"])),
        pooled_projections=rng.standard_normal((B, FLUX_TINY["pooled_projection_dim"])),
        timestep=np.array([0.3, 0.9]),
        img_ids=np.asarray(latent_image_ids(LAT_H, LAT_W)),
        txt_ids=np.asarray(text_ids(N_TXT)),
    )
    if cfg["guidance_embeds"]:
        x["guidance"] = np.array([3.5, 1.0])
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in x.items()}


def _flux_forward(torch, model, x, dtype=None) -> np.ndarray:
    if dtype is not None:
        x = {k: (v if k.endswith("_ids") else v.to(dtype)) for k, v in x.items()}
    with torch.no_grad():
        return model(**x, return_dict=False)[0].float().numpy()


@pytest.fixture(scope="module")
def flux_models(torch, tmp_path_factory):
    """Builds (once per variant) a tiny diffusers FLUX transformer saved by diffusers, our model
    loaded from it, and the torch model's output on random inputs."""
    cache: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant not in cache:
            cache[variant] = _make_flux(torch, tmp_path_factory, variant)
        return cache[variant]

    return get


@pytest.fixture(scope="module", params=sorted(FLUX_VARIANTS))
def flux(request, flux_models):
    return flux_models(request.param)


@pytest.fixture(scope="module")
def flux_dev(flux_models):
    return flux_models("dev")


def _make_flux(torch, tmp_path_factory, variant: str) -> dict:
    diffusers = _diffusers()
    torch.manual_seed(7 + len(variant))
    model = diffusers.FluxTransformer2DModel(**FLUX_TINY, **FLUX_VARIANTS[variant]).eval()
    _randomise_norms(torch, model)
    folder = tmp_path_factory.mktemp(f"flux_{variant}")
    model.save_pretrained(folder, safe_serialization=True)
    x = _flux_inputs(torch, FLUX_VARIANTS[variant], seed=len(variant))
    return dict(variant=variant, model=model, folder=folder, ours=load_flux_transformer(folder), x=x,
                ref=_flux_forward(torch, model, x))


def test_flux_to_diffusers_is_the_inverse_of_convert(torch, flux):
    ours, cfg = flux["ours"], flux["ours"].cfg
    tensors = flux_export.to_diffusers(ours)
    sd = flux["model"].state_dict()
    assert sorted(tensors) == sorted(sd)
    for k, v in sd.items():
        assert tensors.shape(k) == tuple(v.shape), k
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
    want = _flat(ours)
    # every key convert_diffusers accepts is produced, and nothing else (it refuses unused keys)
    _assert_same_params(flux_from_diffusers(tensors, cfg), want)
    # from the model's nnx.State or a plain {path: array} mapping with its config: the same
    _assert_same_params(flux_from_diffusers(dict(flux_export.to_diffusers(nnx.state(ours), cfg)), cfg), want)
    _assert_same_params(flux_from_diffusers(dict(flux_export.to_diffusers(want, cfg)), cfg), want)


def test_flux_to_bfl_is_the_inverse_of_convert(flux):
    ours, cfg = flux["ours"], flux["ours"].cfg
    tensors = flux_export.to_bfl(ours)
    assert ("guidance_in.in_layer.weight" in tensors) == cfg.guidance_embeds
    assert not any(k.startswith("model.diffusion_model.") for k in tensors)
    _assert_same_params(convert_bfl(tensors, cfg), _flat(ours))


def test_flux_save_diffusers_loads_in_diffusers(torch, flux, tmp_path):
    diffusers = _diffusers()
    files = flux_export.save_diffusers(flux["ours"], tmp_path)
    assert sorted(p.name for p in files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    _config_fields_match_init(config, diffusers.FluxTransformer2DModel)
    assert SafetensorsFile(tmp_path / "diffusion_pytorch_model.safetensors").metadata == {"format": "pt"}

    loaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    assert _arch(loaded.config) == _arch(flux["model"].config)
    _assert_same_state_dict(torch, loaded.state_dict(), flux["model"].state_dict())
    out = _flux_forward(torch, loaded, flux["x"])
    err = _max_diff(out, flux["ref"])
    print(f"flux {flux['variant']} diffusers export -> diffusers: max abs output diff {err:.1e}")
    assert err == 0.0
    # and our own loader reads the export back to the same parameters
    _assert_same_params(_flat(load_flux_transformer(tmp_path)), _flat(flux["ours"]))


def _diffusers_bfl_converter(inner_dim: int):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes FLUX.1's width
    (``inner_dim = 3072``, used only to split ``linear1``): recompiled here with the tiny width."""
    from diffusers.loaders import single_file_utils

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1
    scope = dict(vars(single_file_utils))
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), "<flux_bfl_to_diffusers>", "exec"),
         scope)
    return scope[fn.__name__]


def test_flux_save_bfl_loads_here_and_in_diffusers(torch, flux, tmp_path):
    diffusers = _diffusers()
    ours, cfg = flux["ours"], flux["ours"].cfg
    path = flux_export.save_bfl(ours, tmp_path / "flux1-tiny.safetensors")
    # our loader (BFL layout detected from the keys; guidance_embeds from guidance_in.*)
    other = cfg.replace(guidance_embeds=not cfg.guidance_embeds)
    _assert_same_params(_flat(load_flux_transformer(path, config=other)), _flat(ours))

    # diffusers' own BFL -> diffusers converter, loaded strictly
    bfl = safetensors.torch.load_file(path)
    converted = _diffusers_bfl_converter(cfg.inner_dim)(bfl)
    model = diffusers.FluxTransformer2DModel(**FLUX_TINY, **FLUX_VARIANTS[flux["variant"]]).eval()
    model.load_state_dict(converted, strict=True)
    _assert_same_state_dict(torch, model.state_dict(), flux["model"].state_dict())
    err = _max_diff(_flux_forward(torch, model, flux["x"]), flux["ref"])
    print(f"flux {flux['variant']} BFL export -> diffusers converter: max abs output diff {err:.1e}")
    assert err == 0.0


def test_flux_bf16_export(torch, flux_dev, tmp_path):
    diffusers = _diffusers()
    flux = flux_dev
    flux_export.save_diffusers(flux["ours"], tmp_path / "diffusers", dtype="bfloat16")
    f = SafetensorsFile(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    assert {f[k].dtype for k in f} == {np.dtype(ml_dtypes.bfloat16)}
    want = flux["model"].state_dict()
    # numpy's (ml_dtypes) float32 -> bfloat16 rounding is torch's (round to nearest even): exact
    rounded = {k: v.to(torch.bfloat16) for k, v in want.items()}
    upcast = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers").eval()  # float32 params
    _assert_same_state_dict(torch, upcast.state_dict(), rounded, dtype=torch.float32)
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers", torch_dtype=torch.bfloat16)
    _assert_same_state_dict(torch, loaded.eval().state_dict(), rounded)
    # in bfloat16 it is exactly the original model cast to bfloat16
    out = _flux_forward(torch, loaded, flux["x"], dtype=torch.bfloat16)
    cast = diffusers.FluxTransformer2DModel.from_pretrained(flux["folder"], torch_dtype=torch.bfloat16).eval()
    assert _max_diff(out, _flux_forward(torch, cast, flux["x"], dtype=torch.bfloat16)) == 0.0
    # with float32 compute, only the weight rounding shows
    err = _max_diff(_flux_forward(torch, upcast, flux["x"]), flux["ref"])
    print(f"flux bf16 diffusers export, float32 compute: max abs output diff {err:.2e} "
          f"(max|ref| {np.abs(flux['ref']).max():.2f}); bf16 compute vs ref {_max_diff(out, flux['ref']):.2e}")
    assert err < 2e-2 * max(1.0, np.abs(flux["ref"]).max())

    path = flux_export.save_bfl(flux["ours"], tmp_path / "flux1-tiny-bf16.safetensors", dtype="bfloat16")
    bfl = safetensors.torch.load_file(path)  # the reference reader
    assert {v.dtype for v in bfl.values()} == {torch.bfloat16}
    model = diffusers.FluxTransformer2DModel.from_pretrained(flux["folder"], torch_dtype=torch.bfloat16)
    model.load_state_dict(_diffusers_bfl_converter(flux["ours"].cfg.inner_dim)(bfl), strict=True)
    _assert_same_state_dict(torch, model.state_dict(), rounded)
    # our loader into a bf16-parameter model; exporting that (dtype=None) rewrites the same file
    bf16 = load_flux_transformer(path, config=flux["ours"].cfg, param_dtype="bfloat16")
    assert bf16.x_embedder.kernel.dtype == jnp.bfloat16
    again = tmp_path / "again.safetensors"
    flux_export.save_bfl(bf16, again)  # dtype=None keeps the parameters' bfloat16
    assert open(again, "rb").read() == open(path, "rb").read()


def test_flux_sharded_export(torch, flux_dev, tmp_path):
    diffusers = _diffusers()
    flux = flux_dev
    files = flux_export.save_diffusers(flux["ours"], tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in files) == sorted(["config.json", *shards, "diffusion_pytorch_model.safetensors"
                                                    ".index.json"])
    sizes = {k: np.asarray(v).nbytes for k, v in flux["model"].state_dict().items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    _assert_same_state_dict(torch, loaded.state_dict(), flux["model"].state_dict())
    _assert_same_params(_flat(load_flux_transformer(tmp_path)), _flat(flux["ours"]))
    # re-exporting unsharded into the same folder removes the shards and the index (as diffusers does)
    flux_export.save_diffusers(flux["ours"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    _assert_same_params(_flat(load_flux_transformer(tmp_path)), _flat(flux["ours"]))


def test_flux_without_double_or_single_blocks():
    """Random nnx models (no torch) with an empty stack, float32 and bfloat16 parameters."""
    for kw in (dict(num_layers=0), dict(num_single_layers=0, param_dtype="bfloat16")):
        cfg = FluxConfig(**{**FLUX_TINY, "in_channels": 16, **kw})
        model = FluxTransformer(cfg, rngs=nnx.Rngs(3))
        want = _flat(model)
        _assert_same_params(flux_from_diffusers(flux_export.to_diffusers(model), cfg), want)
        _assert_same_params(convert_bfl(flux_export.to_bfl(model), cfg), want)


def test_flux_export_errors(flux_dev, tmp_path):
    flux = flux_dev
    ours = flux["ours"]
    with pytest.raises(CheckpointError, match="cfg="):
        flux_export.to_diffusers(_flat(ours))
    bigger = ours.cfg.replace(num_single_layers=3)
    with pytest.raises(CheckpointError, match="single_transformer_blocks"):
        flux_export.to_bfl(ours, bigger)
    extra = {**_flat(ours), "stray.kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match="stray"):
        flux_export.to_diffusers(extra, ours.cfg)
    with pytest.raises(CheckpointError, match="dtype"):
        flux_export.save_bfl(ours, tmp_path / "x.safetensors", dtype="int8")
    adapted = load_flux_transformer(flux["folder"])
    add_lora(adapted, LoraConfig(rank=2, targets=("qkv",)), nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="merge_lora"):
        flux_export.to_diffusers(adapted)


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Each lazy tensor is built once per file and dropped before the next one is built."""
    alive, built, peak = [0], [], [0]

    def release():
        alive[0] -= 1

    def make(i):
        a = np.full((64, 32), float(i), np.float32)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        built.append(i)
        weakref.finalize(a, release)
        return a

    tensors = flux_export.LazyTensors()
    for i in range(12):
        tensors.add(f"t{i}", (64, 32), np.float32, lambda i=i: make(i))
    dtypes = flux_export.target_dtypes(tensors, "bfloat16")
    flux_export.save_diffusers_folder(tmp_path, tensors, {"_class_name": "X"}, dtypes=dtypes, max_shard_size="20KB")
    assert sorted(built) == list(range(12)) and peak[0] == 1
    back = open_checkpoint(tmp_path, stem="diffusion_pytorch_model")
    assert len(SafetensorsFile(tmp_path / "diffusion_pytorch_model-00001-of-00003.safetensors")) == 4
    for i in range(12):
        assert back[f"t{i}"].dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(back[f"t{i}"].astype(np.float32), np.full((64, 32), float(i)))
    assert flux_export.parse_size("10GB") == 10**10 and flux_export.parse_size("4GiB") == 4 * 2**30


# ---------------------------------------------------------------------------------------------
# Wan2.1.


def _wan_inputs(torch, frames: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    c = WAN_TINY["in_channels"]
    x = dict(hidden_states=rng.standard_normal((B, c, frames, 6, 10)),
             timestep=rng.uniform(0, 1000, (B,)),
             encoder_hidden_states=rng.standard_normal((B, 12, WAN_TINY["text_dim"])))
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in x.items()}


def _wan_forward(torch, model, x, dtype=None) -> np.ndarray:
    if dtype is not None:
        x = {k: (v if k == "timestep" else v.to(dtype)) for k, v in x.items()}
    with torch.no_grad():
        return model(**x, return_dict=False)[0].float().numpy()


@pytest.fixture(scope="module")
def wan_models(torch, tmp_path_factory):
    """Builds (once per variant) a tiny diffusers Wan transformer saved by diffusers, our model
    loaded from it, and the torch model's output on random inputs."""
    cache: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant not in cache:
            cache[variant] = _make_wan(torch, tmp_path_factory, variant)
        return cache[variant]

    return get


@pytest.fixture(scope="module", params=["default", "no_cross_attn_norm"])
def wan(request, wan_models):
    return wan_models(request.param)


def _make_wan(torch, tmp_path_factory, variant: str) -> dict:
    diffusers = _diffusers()
    cfg = dict(WAN_TINY)
    if variant == "no_cross_attn_norm":
        cfg.update(cross_attn_norm=False, out_channels=None, num_layers=1)
    torch.manual_seed(3)
    model = diffusers.WanTransformer3DModel(**cfg).eval()
    _randomise_norms(torch, model)
    folder = tmp_path_factory.mktemp(f"wan_{variant}")
    model.save_pretrained(folder, safe_serialization=True)
    x = _wan_inputs(torch, frames=2, seed=11)
    return dict(variant=variant, cfg=cfg, model=model, folder=folder, ours=load_wan_transformer(folder), x=x,
                ref=_wan_forward(torch, model, x))


def test_wan_to_diffusers_is_the_inverse_of_convert(wan):
    ours, cfg = wan["ours"], wan["ours"].cfg
    tensors = wan_export.to_diffusers(ours)
    sd = wan["model"].state_dict()
    assert sorted(tensors) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
    _assert_same_params(dict(wan_from_diffusers(tensors, cfg)), _flat(ours))


def test_wan_save_diffusers_loads_in_diffusers(torch, wan, tmp_path):
    diffusers = _diffusers()
    wan_export.save_diffusers(wan["ours"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    _config_fields_match_init(config, diffusers.WanTransformer3DModel)
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path).eval()
    assert _arch(loaded.config) == _arch(wan["model"].config)
    _assert_same_state_dict(torch, loaded.state_dict(), wan["model"].state_dict())
    err = _max_diff(_wan_forward(torch, loaded, wan["x"]), wan["ref"])
    print(f"wan {wan['variant']} diffusers export -> diffusers: max abs output diff {err:.1e}")
    assert err == 0.0
    _assert_same_params(_flat(load_wan_transformer(tmp_path)), _flat(wan["ours"]))


def test_wan_bf16_export(torch, wan_models, tmp_path):
    diffusers = _diffusers()
    wan = wan_models("default")
    wan_export.save_diffusers(wan["ours"], tmp_path, dtype="bfloat16", max_shard_size="30KB")
    back = open_checkpoint(tmp_path, stem="diffusion_pytorch_model")
    fp32 = sorted(k for k in back if back[k].dtype == np.float32)
    assert fp32 and all(wan_export.keeps_fp32(k) for k in fp32)
    assert "blocks.0.norm2.weight" in fp32 and "condition_embedder.time_embedder.linear_1.weight" in fp32
    assert all(back[k].dtype == np.dtype(ml_dtypes.bfloat16) for k in back if k not in fp32)
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    got, want = loaded.state_dict(), wan["model"].state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():  # diffusers keeps the same modules float32: those are exact
        assert torch.equal(got[k], v if k in fp32 else v.to(torch.bfloat16)), k
    # exactly what diffusers makes of the original model with torch_dtype=bfloat16
    cast = diffusers.WanTransformer3DModel.from_pretrained(wan["folder"], torch_dtype=torch.bfloat16).eval()
    _assert_same_state_dict(torch, got, cast.state_dict())
    out = _wan_forward(torch, loaded, wan["x"], dtype=torch.bfloat16)
    assert _max_diff(out, _wan_forward(torch, cast, wan["x"], dtype=torch.bfloat16)) == 0.0
    upcast = diffusers.WanTransformer3DModel.from_pretrained(tmp_path).eval()
    err = _max_diff(_wan_forward(torch, upcast, wan["x"]), wan["ref"])
    print(f"wan bf16 diffusers export, float32 compute: max abs output diff {err:.2e} "
          f"(max|ref| {np.abs(wan['ref']).max():.2f}); bf16 compute vs ref {_max_diff(out, wan['ref']):.2e}")
    assert err < 2e-2 * max(1.0, np.abs(wan["ref"]).max())

    everything = tmp_path / "all_bf16"
    wan_export.save_diffusers(wan["ours"], everything, dtype="bfloat16", keep_fp32=False)
    f = SafetensorsFile(everything / "diffusion_pytorch_model.safetensors")
    assert {f[k].dtype for k in f} == {np.dtype(ml_dtypes.bfloat16)}
    diffusers.WanTransformer3DModel.from_pretrained(everything, torch_dtype=torch.bfloat16)


def test_wan_random_models_roundtrip():
    """Random nnx models (no torch): no blocks, and bfloat16 parameters kept as they are."""
    for kw in (dict(num_layers=0), dict(param_dtype="bfloat16", cross_attn_norm=False)):
        cfg = WanConfig(**{**WAN_TINY, **kw})
        model = WanTransformer(cfg, rngs=nnx.Rngs(5))
        _assert_same_params(dict(wan_from_diffusers(wan_export.to_diffusers(model), cfg)), _flat(model))
