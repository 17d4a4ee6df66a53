"""Runs inside the sharding tests' subprocesses (several simulated CPU devices, or several
processes): ``python -m tests.sharding_worker train OUT MESH [MESH ...]`` trains the synthetic world
(tests/sharding_world.py) on each mesh and saves the parameters and metrics as OUT/<mesh>.npz
(process 0); ``python -m tests.sharding_worker checks`` runs the other multi-device checks.

A MESH is ``1`` (one device) or ``axis=size[,axis=size]`` (e.g. ``data=2,fsdp=4``). Environment:
``VIPO_ITERATIONS`` (default 2), and the ``VIPO_*`` variables of ``--distributed`` runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent


def _setup():
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parse_mesh(spec: str) -> dict:
    if spec == "1":
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}


def train_meshes(out: Path, specs: list[str], distributed: bool) -> None:
    import numpy as np

    from vipo_jax import sharding as shd

    if distributed:  # before anything touches a device (the test world makes arrays at import)
        # generous barriers: on 2 shared CI cores one process may compile minutes after the other
        shd.initialize_distributed(initialization_timeout=1200, shutdown_timeout_seconds=1200)
    from tests.sharding_world import tiny_config  # registers the synthetic family
    from vipo_jax.training.metrics_log import read_metrics
    from vipo_jax.training.run import train
    iterations = int(os.environ.get("VIPO_ITERATIONS", "2"))
    for spec in specs:
        sizes = parse_mesh(spec)
        c = tiny_config(iterations, **sizes)
        if os.environ.get("VIPO_EVAL_EVERY"):
            c.log.eval_every = int(os.environ["VIPO_EVAL_EVERY"])
        if os.environ.get("VIPO_CKPT_EVERY"):
            c.log.ckpt_every = int(os.environ["VIPO_CKPT_EVERY"])
        mesh = shd.single_device_mesh() if not sizes else None
        name = spec.replace("=", "").replace(",", "_")
        workdir = out / f"run_{name}"
        result = train(c, workdir, progress=False, mesh=mesh)
        if os.environ.get("VIPO_RESUME_TO"):  # run again to a later iteration: resumes from the checkpoint
            c.train.iterations = int(os.environ["VIPO_RESUME_TO"])
            result = train(c, workdir, progress=False, mesh=mesh)
        params = result["state"]["params"]
        leaves = jax.tree_util.tree_leaves_with_path(shd.fetch(params))
        specs_ = {jax.tree_util.keystr(p): str(a.sharding.spec)
                  for p, a in jax.tree_util.tree_leaves_with_path(params)}
        n_dev = {jax.tree_util.keystr(p): len(a.sharding.device_set)
                 for p, a in jax.tree_util.tree_leaves_with_path(params)}
        if jax.process_index() == 0:
            recs = read_metrics(workdir / "metrics.jsonl")
            np.savez(out / f"{name}.npz", **{jax.tree_util.keystr(p): np.asarray(a) for p, a in leaves})
            (out / f"{name}.json").write_text(json.dumps({"metrics": recs, "specs": specs_, "devices": n_dev,
                                                         "processes": jax.process_count()}))
        print(f"done {spec} on {jax.device_count()} devices, {jax.process_count()} process(es)", flush=True)
    if distributed:
        check_global_batch()


def check_global_batch() -> None:
    """Both ways of assembling a global batch from per-process rows: rows that the batch sharding
    keeps on their own process (make_array_from_process_local_data), and rows it replicates
    (gathered from all processes first)."""
    import numpy as np

    from vipo_jax import sharding as shd

    rules = shd.make_rules()
    p, n = jax.process_index(), jax.process_count()
    for sizes, rows in (({"data": 2, "fsdp": 4}, 2), ({"fsdp": 8}, 1)):
        mesh = shd.make_mesh(sizes)
        local = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * p
        g = shd.global_batch({"x": local}, mesh, rules)["x"]
        want = np.concatenate([np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * q for q in range(n)])
        np.testing.assert_array_equal(shd.fetch(g), want)
        print(f"global_batch ok {sizes} {g.sharding.spec}", flush=True)


def checks() -> None:
    """Group statistics across devices, checkpoint resharding, rule-based loading, and a model
    forward with its activation constraints, each against the single-device result."""
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vipo_jax import rl
    from vipo_jax import sharding as shd
    from vipo_jax.training.checkpoint import RunCheckpointer

    assert jax.device_count() == 8, jax.devices()
    rules = shd.make_rules()
    out = {}

    # 1. group advantages: 2 prompts x G=8 over 8 devices, so each group spans 4 devices
    r = jax.random.normal(jax.random.PRNGKey(0), (16,))
    ref = np.asarray(rl.group_advantages(r, 8))
    mesh = shd.make_mesh({"fsdp": 8})
    with shd.activate(mesh, rules):
        rs = jax.device_put(r, NamedSharding(mesh, P("fsdp")))
        adv = jax.jit(lambda x: rl.group_advantages(x, 8), out_shardings=NamedSharding(mesh, P("fsdp")))(rs)
    assert len(adv.sharding.device_set) == 8
    out["group_adv_err"] = float(np.max(np.abs(np.asarray(adv) - ref)))

    # 2. checkpoint written on fsdp=8, restored into data=2 x fsdp=4 shardings
    import tempfile

    from tests.sharding_world import Velocity

    params = nnx.state(Velocity(nnx.Rngs(1)))
    m8, m24 = shd.make_mesh({"fsdp": 8}), shd.make_mesh({"data": 2, "fsdp": 4})
    opt = optax.adam(1e-3)
    state8 = {"params": shd.place(params, shd.param_shardings(params, rules, m8))}
    state8["opt_state"] = opt.init(state8["params"])
    with tempfile.TemporaryDirectory() as d:
        ck = RunCheckpointer(d)
        ck.save(1, state8, {"iteration": 1})
        target_sh = shd.param_shardings(jax.eval_shape(lambda: state8), rules, m24)
        target = shd.place(jax.tree.map(np.zeros_like, shd.fetch(state8)), target_sh)
        back, meta = ck.restore(target)
        ck.close()
    k8, kb = state8["params"]["l_up"]["kernel"][...], back["params"]["l_up"]["kernel"][...]
    assert k8.sharding.spec == P("fsdp"), k8.sharding
    assert kb.sharding.mesh.shape["data"] == 2 and kb.sharding.spec == P("fsdp"), kb.sharding
    mu = back["opt_state"][0].mu["l_up"]["kernel"][...]
    assert mu.sharding.spec == P("fsdp"), mu.sharding
    out["ckpt_err"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                          for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(back)))

    # 3. the toy DiT loaded straight into its shards (fsdp=4 x tensor=2), and its forward with the
    #    activation constraints equal to the unsharded one
    from vipo_jax.models.flux.packing import latent_image_ids, text_ids
    from vipo_jax.toy import assets

    ref_model = assets.load("transformer")
    m42 = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = assets.load("transformer", sharding=shd.LogicalSharding(rules, m42))
    q = model.transformer_blocks.img_attn.qkv.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor"), q.sharding.spec
    cfg = model.cfg
    img = jax.random.normal(jax.random.PRNGKey(1), (8, 16, cfg.in_channels))
    txt = jax.random.normal(jax.random.PRNGKey(2), (8, 10, cfg.joint_attention_dim))
    pooled = jax.random.normal(jax.random.PRNGKey(3), (8, cfg.pooled_projection_dim))
    sigma = jax.numpy.full((8,), 0.5)
    g = jax.numpy.full((8,), 3.5) if cfg.guidance_embeds else None

    def fwd(m, *a):
        return m(*a, latent_image_ids(8, 8), text_ids(10), guidance=g)

    want = np.asarray(jax.jit(fwd)(ref_model, img, txt, pooled, sigma))
    with shd.activate(m42, rules):
        args = shd.place((img, txt, pooled, sigma), jax.tree.map(
            lambda a: shd.batch_sharding(a.shape, m42, rules), (img, txt, pooled, sigma)))
        got = jax.jit(fwd)(model, *args)
    assert len(got.sharding.device_set) == 8
    out["dit_forward_err"] = float(np.max(np.abs(np.asarray(got) - want)))
    out["dit_forward_scale"] = float(np.max(np.abs(want)))
    print("CHECKS " + json.dumps(out), flush=True)


def main(argv: list[str]) -> None:
    _setup()
    if argv[1] == "train":
        distributed = "--distributed" in argv
        args = [a for a in argv[2:] if a != "--distributed"]
        out = Path(args[0])
        out.mkdir(parents=True, exist_ok=True)
        train_meshes(out, args[1:], distributed)
    elif argv[1] == "checks":
        checks()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
