"""Sharding: logical names -> PartitionSpecs, mesh configs, the models' annotations (fast, one
device, abstract meshes), and in a subprocess with 8 simulated CPU devices the train loop on
several meshes against one device, plus group statistics, checkpoint resharding, rule-based
loading and a sharded DiT forward (tests/sharding_worker.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from tests.sharding_world import tiny_config
from vipo_jax import sharding as shd
from vipo_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
VOCAB = {"layers", "embed", "heads", "mlp", "vocab", "conv_in", "conv_out", "norm", None}


def amesh(**sizes) -> AbstractMesh:
    shape = tuple(sizes.get(a, 1) for a in shd.MESH_AXES)
    return AbstractMesh(shape, shd.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def subprocess_env(devices: int) -> dict:
    """Simulated CPU devices for a child process. PJRT_NPROC: XLA:CPU runs every simulated device
    on one shared thread pool sized to the cores; with 8 devices on 2 cores, devices blocked in a
    collective (or in LAPACK's batched SVD waiting for its own sub-tasks) can take all its threads
    and deadlock. A larger pool avoids that; real accelerators have no such pool."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PJRT_NPROC": "64",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()}


# --- rules -----------------------------------------------------------------------------------------
def test_default_rules_follow_the_porting_table():
    r = shd.make_rules()
    assert r["embed"] == ("fsdp",) and r["conv_in"] == ("fsdp",)
    assert r["heads"] == r["mlp"] == r["vocab"] == r["act_heads"] == r["act_mlp"] == ("tensor",)
    assert r["layers"] == r["norm"] == r["conv_out"] == r["act_embed"] == ()
    assert r["batch"] == ("data", "fsdp") and r["length"] == ("context",)


def test_rule_overrides_from_string_pairs_and_mapping():
    r = shd.make_rules("embed=, mlp=fsdp+tensor,batch=data")
    assert r["embed"] == () and r["mlp"] == ("fsdp", "tensor") and r["batch"] == ("data",)
    assert r["heads"] == ("tensor",)  # untouched defaults stay
    r = shd.make_rules([("embed", None), ("heads", ("tensor", "fsdp")), ("new_name", "context")])
    assert r["embed"] == () and r["heads"] == ("tensor", "fsdp") and r["new_name"] == ("context",)
    assert shd.make_rules({"vocab": "fsdp"})["vocab"] == ("fsdp",)


@pytest.mark.parametrize("bad, match", [("embed=fsdpp", "unknown mesh axis 'fsdpp'"),
                                        ("embed", "is not 'logical=axis"),
                                        ("embed=fsdp+fsdp", "names a mesh axis twice"),
                                        ([("embed", "fsdp", "x")], "not a \\(logical, mesh axes\\) pair"),
                                        ([("embed", 3)], "mesh axes must be None")])
def test_bad_rules_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        shd.make_rules(bad)


def test_rules_from_the_run_config():
    from configs import flux

    c = flux.get_config("toy")
    assert shd.rules_from_config(c) == shd.make_rules()
    c.sharding.rules = "embed=,heads=fsdp"
    r = shd.rules_from_config(c)
    assert r["embed"] == () and r["heads"] == ("fsdp",)


# --- names -> specs --------------------------------------------------------------------------------
def test_logical_to_spec():
    rules, m = shd.make_rules(), amesh(data=2, fsdp=4, tensor=2)
    spec = shd.logical_to_spec
    assert spec(("layers", "embed", "mlp"), rules, m, (3, 64, 128)) == P(None, "fsdp", "tensor")
    assert spec(("batch", None, "act_embed"), rules, m, (16, 5, 64)) == P(("data", "fsdp"))
    assert spec(("batch", "length", "act_heads", None), rules, m, (8, 10, 4, 32)) == P(("data", "fsdp"), None, "tensor")
    assert spec(None, rules, m) == P() and spec((), rules, m, ()) == P()
    # size-1 mesh axes never appear, so one device gives fully replicated specs
    assert spec(("layers", "embed", "mlp"), rules, amesh(), (3, 64, 128)) == P()


def test_an_axis_that_does_not_divide_is_dropped_with_one_warning(caplog):
    rules, m = shd.make_rules(), amesh(data=2, fsdp=4, tensor=2)
    with caplog.at_level(logging.WARNING, logger="vipo_jax.sharding.rules"):
        assert shd.logical_to_spec(("batch", None), rules, m, (2, 7)) == P("data")  # data=2 fits, x4 does not
        assert shd.logical_to_spec(("batch", None), rules, m, (2, 7)) == P("data")
        assert shd.logical_to_spec(("embed", "mlp"), rules, m, (6, 3)) == P()  # neither 4 nor 2 divides
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("'batch', size 2" in s for s in msgs) == 1, msgs  # once, not per call
    assert any("'embed', size 6" in s for s in msgs) and any("'mlp', size 3" in s for s in msgs)


def test_a_mesh_axis_is_used_once_per_spec():
    rules = shd.make_rules("embed=fsdp,mlp=fsdp+tensor")
    m = amesh(fsdp=4, tensor=2)
    assert shd.logical_to_spec(("embed", "mlp"), rules, m, (8, 8)) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "embed"), rules, m, (8, 8)) == P("fsdp")


def test_unknown_names_and_rank_mismatches_are_clear_errors():
    rules, m = shd.make_rules(), amesh(fsdp=2)
    with pytest.raises(ConfigError, match="no sharding rule for the logical axis name 'emb'.*emb=fsdp"):
        shd.logical_to_spec(("emb",), rules, m, (4,))
    with pytest.raises(ValueError, match="do not match a value of shape"):
        shd.logical_to_spec(("embed", "mlp"), rules, m, (4,))


# --- mesh configs ----------------------------------------------------------------------------------
def test_mesh_shapes():
    assert shd.mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert shd.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 16)["fsdp"] == 4
    assert shd.mesh_shape({"data": 2, "fsdp": 4}, 8)["fsdp"] == 4
    assert shd.mesh_shape(None, 8)["data"] == 8


@pytest.mark.parametrize("cfg, n, match", [
    ({"data": -1, "fsdp": -1}, 8, "only one axis may be -1"),
    ({"data": 3}, 8, "has 3 devices, but there are 8"),
    ({"data": 2, "fsdp": 2}, 8, "has 4 devices, but there are 8"),
    ({"data": 3, "fsdp": -1}, 8, "multiple of 3 devices"),
    ({"fsdp": 0}, 8, "mesh.fsdp=0 must be a positive integer or -1"),
    ({"fsdp": "2"}, 8, "must be a positive integer"),
    ({"pipeline": 2}, 8, "unknown axes \\['pipeline'\\]"),
])
def test_bad_mesh_configs_are_config_errors(cfg, n, match):
    with pytest.raises(ConfigError, match=match):
        shd.mesh_shape(cfg, n)


def test_the_run_config_mesh_fits_one_device():
    from configs import flux

    for arg in ("toy", ""):
        mesh = shd.make_mesh(flux.get_config(arg).mesh)
        assert mesh.axis_names == shd.MESH_AXES and mesh.size == jax.device_count()
        assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="there are 1"):
        shd.make_mesh({"fsdp": 2}, devices=jax.devices()[:1])


# --- the models' annotations -----------------------------------------------------------------------
def _abstract_models():
    from vipo_jax.models.clip import CLIPModel
    from vipo_jax.models.clip.config import CLIPConfig
    from vipo_jax.models.dinov2 import Dinov2Model
    from vipo_jax.models.dinov2 import preset as dino_preset
    from vipo_jax.models.flux import FluxTransformer
    from vipo_jax.models.flux import preset as flux_preset
    from vipo_jax.models.t5 import T5Config, T5Encoder
    from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

    t5 = dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, vocab_size=100)
    cfgs = {
        "flux-dev": (FluxTransformer, flux_preset("flux-dev")),
        "vae": (AutoencoderKL, AutoencoderKLConfig.flux1()),
        "t5": (T5Encoder, T5Config.from_dict({"model_type": "t5", **t5})),
        "umt5": (T5Encoder, T5Config.from_dict({"model_type": "umt5", **t5})),
        "clip": (CLIPModel, CLIPConfig()),
        "dinov2-g-registers": (Dinov2Model, dino_preset("vit_g14", registers=True)),
        "dinov2-b": (Dinov2Model, dino_preset("vit_b14")),
    }
    return {k: nnx.eval_shape(lambda cls=cls, cfg=cfg: cls(cfg, rngs=nnx.Rngs(0))) for k, (cls, cfg) in cfgs.items()}


@pytest.fixture(scope="module")
def abstract_models():
    return _abstract_models()


def test_every_parameter_has_logical_names(abstract_models):
    for name, model in abstract_models.items():
        for path, var in nnx.to_flat_state(nnx.state(model)):
            where = f"{name}: {'.'.join(map(str, path))}"
            names = var.get_metadata().get("out_sharding")
            shape = var.get_value().shape
            assert names is not None, f"{where} has no logical axis names"
            assert len(names) == len(shape), f"{where}: names {names} for shape {shape}"
            assert set(names) <= VOCAB, f"{where}: {names} outside the PORTING.md vocabulary"
            stacked = any(p in ("transformer_blocks", "single_transformer_blocks", "blocks", "layers") for p in path)
            assert (names[:1] == ("layers",)) == stacked, f"{where}: {names}"


def test_flux_dev_is_fully_sharded_by_the_default_rules(abstract_models):
    """FLUX.1-dev's state on fsdp=8 (and fsdp=4 x tensor=2): every big matrix is split, and all
    but a sliver of the bytes (norm scales, biases of odd sizes) live on one device each."""
    model = abstract_models["flux-dev"]
    rules = shd.make_rules()
    for m, want in ((amesh(fsdp=8), P(None, "fsdp")), (amesh(fsdp=4, tensor=2), P(None, "fsdp", "tensor"))):
        sh = shd.param_shardings(model, rules, m)
        assert sh["transformer_blocks"]["img_mlp"]["linear_in"]["kernel"].get_value().spec == want
        assert sh["transformer_blocks"]["img_attn"]["norm_q"]["scale"].get_value().spec == P()
        total = split = 0
        for (_, var), (_, s) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(sh)):
            n = int(np.prod(var.get_value().shape))
            total += n
            split += n if s.get_value().spec != P() else 0
        assert split / total > 0.999, split / total


def test_param_shardings_of_a_train_state_replicate_counters():
    import optax

    from tests.sharding_world import Velocity
    from vipo_jax.training.run import init_state

    params = nnx.state(Velocity(nnx.Rngs(0)))
    abstract = jax.eval_shape(lambda p: init_state(p, optax.adam(1e-3), 0), params)
    sh = shd.param_shardings(abstract, shd.make_rules(), amesh(fsdp=2, tensor=2))
    assert jax.tree.structure(sh) == jax.tree.structure(abstract)
    assert sh["params"]["l_up"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert sh["opt_state"][0].mu["l_up"]["kernel"].get_value().spec == P("fsdp", "tensor")  # moments like params
    assert sh["step"].spec == P() and sh["rng"].spec == P() and sh["opt_state"][0].count.spec == P()


def test_constrain_is_the_identity_without_a_mesh():
    x = jnp.ones((4, 3))
    assert shd.constrain(x, ("batch", None)) is x
    jaxpr = jax.make_jaxpr(lambda a: shd.constrain(a, ("batch", None)))(x)
    assert "sharding_constraint" not in str(jaxpr)
    with shd.activate(shd.single_device_mesh(), shd.make_rules()):  # splits nothing: no constraint either
        assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: shd.constrain(a, ("batch", None)))(x))


def test_logical_sharding_loads_by_names(tmp_path):
    from tests.sharding_world import Velocity
    from vipo_jax.weights.native import load_native, save_native

    save_native(Velocity(nnx.Rngs(0)), tmp_path / "v", {}, "velocity")
    mesh = shd.single_device_mesh()
    fn = shd.LogicalSharding(shd.make_rules(), mesh)
    with pytest.raises(ValueError, match="bound"):
        fn("l_up.kernel", jax.ShapeDtypeStruct((64, 128), jnp.float32))

    @dataclasses.dataclass
    class Cfg:
        """The test velocity model takes no configuration."""

    model = load_native(tmp_path / "v", "velocity", Cfg, lambda cfg, rngs: Velocity(rngs), sharding=fn)
    k = model.l_up.kernel[...]
    assert k.sharding.mesh.axis_names == shd.MESH_AXES and k.sharding.spec == P()
    assert model.l_up.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")  # names survive loading


# --- multi-host start-up -----------------------------------------------------------------------------
def test_distributed_args_from_the_environment():
    env = {"VIPO_COORDINATOR": "10.0.0.1:8476", "VIPO_NUM_PROCESSES": "4", "VIPO_PROCESS_ID": "3"}
    assert shd.distributed_args(env) == {"coordinator_address": "10.0.0.1:8476", "num_processes": 4,
                                         "process_id": 3}
    assert shd.distributed_args({}) == {}  # all auto-detected (TPU pod, SLURM)
    assert shd.distributed_args({"VIPO_PROCESS_ID": "1"}) == {"process_id": 1}


@pytest.mark.parametrize("env, match", [({"VIPO_COORDINATOR": "10.0.0.1"}, "must be host:port"),
                                        ({"VIPO_NUM_PROCESSES": "two"}, "must be an integer"),
                                        ({"VIPO_NUM_PROCESSES": "0"}, "must be >= 1"),
                                        ({"VIPO_NUM_PROCESSES": "2", "VIPO_PROCESS_ID": "2"}, "must be < ")])
def test_bad_distributed_environment_is_a_config_error(env, match):
    with pytest.raises(ConfigError, match=match):
        shd.distributed_args(env)


def test_global_batch_on_one_process():
    mesh = shd.single_device_mesh()
    b = shd.global_batch({"cond": {"emb": np.ones((4, 3), np.float32)}}, mesh, shd.make_rules())
    assert b["cond"]["emb"].shape == (4, 3) and b["cond"]["emb"].sharding.mesh.size == 1


# --- 8 simulated devices ---------------------------------------------------------------------------
MESHES = ("1", "data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2")
# how the synthetic world's (64, 128) ("embed", "mlp") kernel is split on each mesh
KERNEL_SPEC = {"data8": "P()", "fsdp8": "P('fsdp',)", "data2_fsdp4": "P('fsdp',)",
               "fsdp4_tensor2": "P('fsdp', 'tensor')"}
U = 2.0 ** -24  # float32 unit roundoff
DEVICES = 8
# Where two meshes (or host counts) can first differ: the first iteration, from identical parameters
# and data. Their per-device programs do the same arithmetic; only the order in which cross-device
# all-reduces combine the <= 8 per-device partial sums differs, off by at most 2(D-1)u * sum|partials|
# <= 2(D-1)D u relative to max(1, |value|); a metric passes through a few such reductions in a chain
# (hidden layer, velocity, reward mean, loss mean): 4x that.
TOL_FIRST = 4 * 2 * (DEVICES - 1) * DEVICES * U  # 2.7e-5
TOL = TOL_FIRST  # a single forward on several devices vs one: the same bound


def param_bound(metrics: list[dict], lr: float, eps: float, n_updates: int) -> float:
    """How far the final parameters may drift apart, relative to max(1, |p|): every optimizer update
    turns a gradient difference |dg| <= TOL_FIRST * max(1, |g|) into a parameter difference of at
    most lr * |dg| / eps (Adam's step lr * m / (sqrt(v) + eps) changes by at most 1/eps per unit of
    gradient, its most sensitive point being g = 0), and |g| <= the logged global gradient norm.
    Later rollouts from the slightly different parameters add second-order terms, which a factor 2
    covers."""
    updates = [r for r in metrics if "grad_norm" in r]
    per_update = [lr * TOL_FIRST * max(1.0, r["grad_norm"], r["grad_norm_first_update"]) / eps for r in updates]
    return 2 * n_updates * sum(per_update)  # grad_norm is the mean over an iteration's updates


def compare_runs(out: Path, ref: str, name: str) -> tuple[float, float, float]:
    """(max relative parameter difference, max relative difference of the first iteration's
    metrics, the parameter bound of :func:`param_bound`) of two runs."""
    a, b = np.load(out / f"{ref}.npz"), np.load(out / f"{name}.npz")
    p_err = max(float(np.max(np.abs(b[k] - a[k]))) / max(1.0, float(np.max(np.abs(a[k])))) for k in a)
    ra, rb = (json.loads((out / f"{n}.json").read_text())["metrics"] for n in (ref, name))
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    # Only what comes before any optimizer step: the first iteration's rollout, rewards, maps and its
    # first update's loss and gradient norm (the iteration's other metrics average in later updates,
    # after Adam has amplified the difference; the evaluation at step 0 runs the initial parameters).
    first = [(x, y) for x, y in zip(ra, rb) if x["step"] <= 1]
    keys = ("reward/", "reward_std/", "map/", "eval/", "loss_first_update", "grad_norm_first_update",
            "ratio_dev_first_update", "logp/")
    m_err = max(abs(y[k] - x[k]) / max(1.0, abs(x[k])) for x, y in first for k in x
                if isinstance(x[k], float) and k.startswith(keys))
    c = tiny_config()
    return p_err, m_err, param_bound(ra, c.optim.lr, c.optim.eps, c.train.num_updates)


@pytest.mark.slow
def test_sharded_training_matches_one_device(tmp_path):
    """Two iterations of the full train loop (2 updates each) of the synthetic world on each mesh
    give the single-device parameters and metrics to float32 rounding; the parameters are split."""
    out = subprocess.run([sys.executable, "-m", "tests.sharding_worker", "train", str(tmp_path), *MESHES],
                         cwd=ROOT, env=subprocess_env(8), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = {}
    for spec in MESHES[1:]:
        name = spec.replace("=", "").replace(",", "_")
        p_err, m_err, p_tol = compare_runs(tmp_path, "1", name)
        report[name] = (p_err, m_err, p_tol)
        info = json.loads((tmp_path / f"{name}.json").read_text())
        kernel = "['l_up']['kernel'].value"
        assert info["specs"][kernel] == KERNEL_SPEC[name] and info["devices"][kernel] == 8, (name, info)
        assert m_err <= TOL_FIRST and p_err <= p_tol, (name, p_err, m_err, p_tol)
    print("max relative differences to one device (params, first-iteration metrics, param bound):", report)


@pytest.mark.slow
def test_group_statistics_checkpoints_loading_and_dit_forward_on_8_devices():
    out = subprocess.run([sys.executable, "-m", "tests.sharding_worker", "checks"], cwd=ROOT,
                         env=subprocess_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("CHECKS ", 1)[1].splitlines()[0])
    assert res["group_adv_err"] < 1e-6, res  # G=8 samples of a prompt on 4 devices
    assert res["ckpt_err"] == 0.0, res  # fsdp=8 checkpoint restored into data=2 x fsdp=4
    assert res["dit_forward_err"] <= TOL * max(1.0, res["dit_forward_scale"]), res
    print(res)


@pytest.mark.parametrize("args, env, match", [
    (["--distributed"], {"VIPO_COORDINATOR": "nohostport"}, "VIPO_COORDINATOR='nohostport' must be host:port"),
    (["--config.mesh.fsdp=3"], {}, "mesh .* has 3 devices, but there are 1"),
])
def test_cli_reports_bad_mesh_and_launch_settings(tmp_path, args, env, match):
    """Both fail before any model is loaded, with exit status 2 and the message on stderr."""
    import re

    cmd = [sys.executable, "-m", "vipo_jax.train", "--config=configs/flux.py:toy", f"--workdir={tmp_path}", *args]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and re.search(match, out.stderr), out.stderr[-2000:]
