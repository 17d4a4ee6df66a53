"""``python -m vipo_jax.export --format=native|diffusers|bfl --dtype=...`` on a toy LoRA + EMA run.

The run is written, not trained (as in test_evaluate): the toy world's config with LoRA and EMA on,
and a checkpoint whose adapters are random and visibly non-zero, so the merge changes the output.
The toy policy is a tiny FLUX.1 DiT, so diffusers loads the diffusers export; its float32 output
must equal our merged model's to within float32 rounding, and every layout must load back with
``load_exported`` to the merged parameters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs import flux, wan
from vipo_jax.errors import ConfigError
from vipo_jax.evaluation import CheckpointSpec
from vipo_jax.evaluation.export import check_format, export_policy, load_exported, load_policy
from vipo_jax.evaluation.run import checkpoint_params
from vipo_jax.models.flux import latent_image_ids, text_ids
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.lora import initial_adapters, lora_config
from vipo_jax.training.optim import make_optimizer
from vipo_jax.training.run import init_state

ROOT = Path(__file__).resolve().parent.parent
STEP, B, N_TXT, LAT = 3, 2, 6, 16  # LAT: the toy latent grid (64 px / 4), packed 2x2 into 64 tokens


def _config():
    c = flux.get_config("toy")
    c.lora.rank, c.lora.alpha, c.train.ema_decay = 2, 4.0, 0.5
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy LoRA + EMA workdir with random adapters (params) and half of them (EMA) at step 3, and
    the merged policy evaluation reads from it (what every export must hold)."""
    d = tmp_path_factory.mktemp("lora_run")
    c = _config()
    (d / "config.json").write_text(c.to_json_best_effort(indent=1))
    policy, _ = load_policy(c)
    adapters = initial_adapters(policy, lora_config(c))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    adapters = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    state = init_state(adapters, make_optimizer(c), 0, ema=True)
    state["ema"] = jax.tree.map(lambda x: 0.5 * x, state["ema"])
    ck = RunCheckpointer(d)
    ck.save(STEP, state, {"iteration": STEP})
    ck.close()
    base = nnx.state(policy)
    merged, step, _ = checkpoint_params(CheckpointSpec("r", str(d)), policy, base)
    assert step == STEP
    return SimpleNamespace(dir=d, policy=policy, base=base, merged=merged)


def _flat(state) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in nnx.to_flat_state(state)}


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return dict(img=rng.standard_normal((B, (LAT // 2) ** 2, 16)).astype(np.float32),
                txt=rng.standard_normal((B, N_TXT, 64)).astype(np.float32),
                pooled=rng.standard_normal((B, 64)).astype(np.float32),
                timestep=np.array([0.3, 0.9], np.float32),
                img_ids=np.array(latent_image_ids(LAT, LAT)), txt_ids=np.array(text_ids(N_TXT)),
                guidance=np.array([3.5, 1.0], np.float32))


def _ours(policy, params, x) -> np.ndarray:
    graphdef, _ = nnx.split(policy)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
    return np.asarray(fwd(params, {k: jnp.asarray(v) for k, v in x.items()}))


def _diffusers():
    # torchvision's compiled fake-op registrations do not match the pinned CPU torch; diffusers
    # never uses those ops (as in tests/test_export_layouts.py and tests/conftest.py).
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import diffusers

    return diffusers


def _float32_bound(cfg, scale: float) -> float:
    """How far two float32 evaluations of the same forward may differ when only the order of
    operations differs (torch on CPU vs XLA): about sqrt(n) u for a length-n reduction (rounding
    errors of random sign, u = 2^-24), added along the longest chain of reductions (per double
    block: qkv, QK^T, AV, out, MLP in/out; per single block: linear1, QK^T, AV, linear2; the
    embedders and the final layer), times the output's scale, with a factor 10 for the
    normalisations and softmax between them (the toy model's measured difference, 1.7e-5 at scale
    3.7, is a quarter of the bound without that factor)."""
    u = 2.0 ** -24
    d, mlp, n_tok = cfg.inner_dim, cfg.mlp_hidden_dim, (LAT // 2) ** 2 + N_TXT
    per_double = [d, cfg.attention_head_dim, n_tok, d, d, mlp]
    per_single = [d, cfg.attention_head_dim, n_tok, d + mlp]
    chain = [cfg.joint_attention_dim, d, d] + per_double * cfg.num_layers + per_single * cfg.num_single_layers + [d, d]
    return 10 * u * sum(math.sqrt(n) for n in chain) * scale


@pytest.mark.torch
def test_diffusers_export_loads_in_diffusers_and_matches_the_merged_model(torch, run, tmp_path):
    out = tmp_path / "diffusers"
    rec = export_policy(run.dir, out, fmt="diffusers", dtype="float32")
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]
    saved = json.loads((out / "export.json").read_text())
    assert saved == rec
    assert (rec["format"], rec["dtype"], rec["step"], rec["ema"], rec["weights"]) == ("diffusers", "float32", STEP,
                                                                                    False, "params")
    assert rec["lora"]["rank"] == 2 and rec["lora"]["scale"] == 2.0
    assert not (out / "vae").exists()  # a toy-assets folder only in the native layout

    model = _diffusers().FluxTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    assert next(model.parameters()).dtype == torch.float32
    x = _inputs()
    with torch.no_grad():
        theirs = model(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                       pooled_projections=torch.from_numpy(x["pooled"]), timestep=torch.from_numpy(x["timestep"]),
                       img_ids=torch.from_numpy(x["img_ids"]), txt_ids=torch.from_numpy(x["txt_ids"]),
                       guidance=torch.from_numpy(x["guidance"]), return_dict=False)[0].numpy()
    ours = _ours(run.policy, run.merged, x)
    base = _ours(run.policy, run.base, x)
    scale = float(np.abs(ours).max())
    bound = _float32_bound(run.policy.cfg, scale)
    err = float(np.abs(theirs.astype(np.float64) - ours).max())
    moved = float(np.abs(ours - base).max())
    print(f"diffusers export vs our merged model: max abs diff {err:.2e} (float32 bound {bound:.2e}, "
          f"output scale {scale:.2f}; the merge moved the output by {moved:.2e})")
    assert err <= bound
    assert moved > 100 * bound  # the adapters were merged: the base model's output is far off

    # load_exported reads the diffusers folder back to exactly the merged parameters
    back, want = _flat(nnx.state(load_exported(out))), _flat(run.merged)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v, err_msg=str(k))


def test_native_bfloat16_and_bfl_exports_load_back(run, tmp_path):
    want = _flat(run.merged)
    # native bfloat16: a toy-assets folder whose transformer holds the merged weights rounded once
    rec = export_policy(run.dir, tmp_path / "native", fmt="native", dtype="bfloat16")
    assert (rec["format"], rec["dtype"], rec["kind"]) == ("native", "bfloat16", "flux")
    assert (tmp_path / "native" / "vae").is_dir()
    back = _flat(nnx.state(load_exported(tmp_path / "native")))
    for k, v in want.items():
        assert back[k].dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(back[k], v.astype(ml_dtypes.bfloat16), err_msg=str(k))
    # BFL single file (bfloat16 by default), its architecture in export.json; the EMA weights
    rec = export_policy(run.dir, tmp_path / "bfl", fmt="bfl", use_ema=True)
    assert (rec["format"], rec["dtype"], rec["ema"], rec["weights"]) == ("bfl", "bfloat16", True, "ema")
    assert sorted(p.name for p in (tmp_path / "bfl").iterdir()) == ["export.json", "flux1-dev-vipo.safetensors"]
    ema, _, _ = checkpoint_params(CheckpointSpec("e", str(run.dir), ema=True), run.policy, run.base)
    back = _flat(nnx.state(load_exported(tmp_path / "bfl", param_dtype="float32")))
    for k, v in _flat(ema).items():
        np.testing.assert_array_equal(back[k], v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=str(k))


def test_format_and_dtype_errors():
    assert check_format("native", None, "flux") == "float32"
    assert check_format("diffusers", None, "wan") == "bfloat16"
    assert check_format("bfl", "float16", "flux") == "float16"
    with pytest.raises(ConfigError, match="choose one of native, diffusers, bfl"):
        check_format("comfy", None, "flux")
    with pytest.raises(ConfigError, match="--format=bfl is for flux models only"):
        check_format("bfl", None, "wan")
    with pytest.raises(ConfigError, match="--dtype='float64'"):
        check_format("diffusers", "float64", "flux")


def test_cli_refuses_bfl_for_wan(tmp_path):
    """A Wan run exported as a BFL file: one ``error:`` line, exit status 2, nothing written."""
    work = tmp_path / "wan_run"
    (work / "checkpoints").mkdir(parents=True)
    (work / "config.json").write_text(wan.get_config("toy").to_json_best_effort(indent=1))
    r = subprocess.run([sys.executable, "-m", "vipo_jax.export", f"--workdir={work}", f"--out={tmp_path / 'o'}",
                        "--format=bfl"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --format=bfl is for flux models only"), r.stderr
    assert not (tmp_path / "o").exists()


def test_wan_diffusers_export_loads_back(tmp_path):
    """The video toy world's Wan DiT (a full fine-tune written as a checkpoint): float32 exactly;
    bfloat16 except the modules diffusers keeps in float32."""
    c = wan.get_config("toy")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(c.to_json_best_effort(indent=1))
    policy, _ = load_policy(c)
    moved = jax.tree.map(lambda p: p * 0.5, nnx.state(policy))
    ck = RunCheckpointer(tmp_path / "run")
    ck.save(STEP, init_state(moved, make_optimizer(c), 0), {"iteration": STEP})
    ck.close()
    want = _flat(moved)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        rec = export_policy(tmp_path / "run", out, fmt="diffusers", dtype=dtype)
        assert (rec["class_name"], rec["lora"], rec["step"]) == ("WanTransformer3DModel", None, STEP)
        back = _flat(nnx.state(load_exported(out, param_dtype="float32")))
        assert sorted(back) == sorted(want)
        for k, v in want.items():
            kept = dtype == "float32" or any(m in k for m in ("time_embedder", "scale_shift_table", "norm2"))
            expect = v if kept else v.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(back[k], expect, err_msg=str(k))
