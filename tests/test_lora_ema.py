"""LoRA fine-tuning, the EMA of the trained weights, merge-and-export and AOT compilation.

Two tiers: a synthetic step (an MLP velocity of LoRA-capable layers, compiles in seconds) for the
step-level properties, and the toy world (real Flux DiT class, one prompt x 2 samples) for the
loop, checkpoints, resume, export and evaluation; its runs share one module-scoped set of
workdirs and, through the persistent compilation cache, one compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import flux
from tests.test_train_step import DECODER, LATENT, PROJ, decode_fn, feature_fn
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.nn.lora import Linear
from vipo_jax.rewards.pixels import redness
from vipo_jax.training.checks import check_config as validate
from vipo_jax.training.lora import initial_adapters, lora_config
from vipo_jax.training.run import init_state, train
from vipo_jax.training.step import make_train_step
from vipo_jax.training.step_config import StepConfig
from vipo_jax.worlds import BASE_KEY, get_family
from vipo_jax.worlds.world import adapted_policy, merge_lora_state, split_lora

ROOT = Path(__file__).resolve().parent.parent
C = LATENT[-1]


# --- the synthetic step ------------------------------------------------------------------------------------
class Velocity(nnx.Module):
    def __init__(self, rngs):
        self.l1 = Linear(C + 1 + 4, 32, rngs=rngs)
        self.l2 = Linear(32, C, rngs=rngs)

    def __call__(self, x, sigma, cond):
        b, h, w, _ = x.shape
        feats = jnp.concatenate([x, jnp.broadcast_to(sigma[:, None, None, None], (b, h, w, 1)),
                                 jnp.broadcast_to(cond["emb"][:, None, None, :], (b, h, w, 4))], -1)
        return self.l2(jax.nn.gelu(self.l1(feats)))


STEP_CFG = StepConfig(num_steps=6, shift=3.0, eta=0.3, group_size=4, rewards=(("redness", 1.0),))
BATCH = {"cond": {"emb": jax.random.normal(jax.random.PRNGKey(3), (2, 4))}}
DECAY = 0.9


@pytest.fixture(scope="module")
def synthetic():
    """The LoRA + EMA step of the synthetic policy, compiled once; ``fresh()`` gives a new state and
    frozen tree (``frozen["scale"]`` multiplies the reward: NaN makes every update non-finite)."""
    model = Velocity(nnx.Rngs(0))
    c = flux.get_config("toy")
    c.lora.rank, c.lora.alpha, c.lora.targets = 2, 4.0, "l1,l2"
    graphdef, params, base, paths = split_lora(model, lora_config(c), c.seed)
    assert paths == ["l1", "l2"] and graphdef is not nnx.graphdef(model)
    frozen = {"dec": DECODER, "proj": PROJ, BASE_KEY: base}

    def velocity_fn(p, x, s, cond):
        return nnx.merge(graphdef, p)(x, s, cond)

    opt = optax.adamw(3e-2, weight_decay=1e-4)
    step = make_train_step(STEP_CFG, velocity_fn=velocity_fn, decode_fn=decode_fn,
                           reward_fns={"redness": lambda f, im, b: redness(im) * f["scale"]},
                           feature_fn=feature_fn, optimizer=opt, latent_shape=LATENT,
                           policy_params=merge_lora_state, ema_decay=DECAY)

    def fresh(scale: float = 1.0):
        state = init_state(jax.tree.map(jnp.copy, params), opt, seed=0, ema=True)
        return state, {**frozen, "scale": jnp.float32(scale)}

    return SimpleNamespace(step=jax.jit(step, donate_argnums=0), fresh=fresh, model=model,
                           velocity_fn=velocity_fn)


def _np(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def test_lora_step_trains_only_the_adapters(synthetic):
    state, frozen = synthetic.fresh()
    base_before = _np(frozen[BASE_KEY])
    adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(state["params"])}
    assert len(jax.tree.leaves(state["params"])) == 4  # A and B of two layers
    # optimizer moments exist for the adapters only (plus scalar counters)
    assert {tuple(x.shape) for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == adapter_shapes
    # B = 0 at the start: the merged policy is the base policy, bit for bit
    x = jax.random.normal(jax.random.PRNGKey(1), (2,) + LATENT)
    sig = jnp.full((2,), 0.5)
    np.testing.assert_array_equal(
        np.asarray(synthetic.velocity_fn(merge_lora_state(state["params"], frozen), x, sig, BATCH["cond"])),
        np.asarray(synthetic.model(x, sig, BATCH["cond"])))
    b0 = _np(state["params"])
    for _ in range(3):
        state, m = synthetic.step(state, frozen, BATCH)
        assert float(m["ratio_dev_first_update"]) == 0.0  # on-policy ratio exactly 1 with LoRA
        assert float(m["updates_skipped"]) == 0.0 and float(m["grad_norm"]) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(b0, _np(state["params"])))  # the adapters moved
    for a, b in zip(base_before, _np(frozen[BASE_KEY])):  # the base weights did not
        np.testing.assert_array_equal(a, b)
    merged = synthetic.velocity_fn(merge_lora_state(state["params"], frozen), x, sig, BATCH["cond"])
    assert not np.allclose(np.asarray(merged), np.asarray(synthetic.model(x, sig, BATCH["cond"])))


def test_ema_update_formula_and_skip_safety(synthetic):
    state, frozen = synthetic.fresh()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["ema"]))
    for _ in range(2):
        ema0 = _np(state["ema"])
        state, _ = synthetic.step(state, frozen, BATCH)
        for e0, p1, e1 in zip(ema0, _np(state["params"]), _np(state["ema"])):
            np.testing.assert_allclose(e1, DECAY * e0 + (1 - DECAY) * p1.astype(np.float64), rtol=1e-6, atol=1e-7)
    # every update skipped (non-finite reward): params and EMA stay as they were, finite
    _, nan_frozen = synthetic.fresh(scale=float("nan"))
    ema0, p0 = _np(state["ema"]), _np(state["params"])
    for _ in range(2):
        state, m = synthetic.step(state, nan_frozen, BATCH)
        assert float(m["updates_skipped"]) == 1.0
    for a, b in zip(ema0 + p0, _np(state["ema"]) + _np(state["params"])):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(b).all()


def test_bad_config_values():
    def cfg(**over):
        c = flux.get_config("toy")
        for k, v in over.items():
            section, name = k.split(".")
            c[section][name] = v
        return c

    validate(cfg(**{"lora.rank": 4, "train.ema_decay": 0.99}))
    for over, match in [({"lora.rank": -1}, "lora.rank"), ({"lora.rank": 2, "lora.alpha": -1.0}, "lora.alpha"),
                        ({"train.ema_decay": 1.0}, "ema_decay"), ({"train.ema_decay": -0.1}, "ema_decay"),
                        ({"lora.rank": 2, "lora.targets": "attn,("}, "not a regular expression")]:
        with pytest.raises(ConfigError, match=match):
            validate(cfg(**over))
    assert lora_config(cfg(**{"lora.rank": 2})).targets == get_family("flux").lora_targets
    assert not lora_config(cfg()).enabled


def test_default_targets_are_the_attention_and_mlp_projections():
    """On the full-size FLUX.1 and Wan2.1 DiTs (abstract, no weights)."""
    from vipo_jax.models.flux import FluxConfig, FluxTransformer
    from vipo_jax.models.wan import WanTransformer
    from vipo_jax.models.wan.config import preset
    from vipo_jax.nn.lora import lora_layers
    from vipo_jax.weights.loading import abstract_model

    flux_paths = [p for p, _ in lora_layers(abstract_model(FluxTransformer, FluxConfig()),
                                            get_family("flux").lora_targets)]
    assert flux_paths == ["single_transformer_blocks.linear1", "single_transformer_blocks.linear2"] + [
        f"transformer_blocks.{s}_{n}" for s in ("img", "txt")
        for n in ("attn.qkv", "attn_out", "mlp.linear_in", "mlp.linear_out")]
    wan_paths = [p for p, _ in lora_layers(abstract_model(WanTransformer, preset("wan2.1-t2v-1.3b")),
                                           get_family("wan").lora_targets)]
    assert wan_paths == [f"blocks.attn{i}.to_{n}" for i in (1, 2) for n in ("k", "out", "q", "v")] + [
        "blocks.ffn.linear_in", "blocks.ffn.linear_out"]


# --- the toy world ------------------------------------------------------------------------------------------
RANK, ALPHA, EMA = 2, 4.0, 0.5


def toy_config(iterations: int, **over):
    c = flux.get_config("toy")
    c.train.iterations = iterations
    c.sampling.prompts_per_iter = 1
    c.sampling.group_size = 2
    c.log.eval_every = 0
    c.log.ckpt_every = 1
    c.log.num_eval_prompts = 2
    c.log.tensorboard = False
    c.log.phase_times = False
    c.lora.rank, c.lora.alpha, c.train.ema_decay = RANK, ALPHA, EMA
    c.optim.lr = 1e-3  # visible adapter changes in a few iterations
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


@pytest.fixture(scope="module")
def world():
    from vipo_jax.worlds import build_world

    return build_world(toy_config(1))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A 3-iteration LoRA + EMA run, and the same run stopped after 2 (with evaluation at its start
    and end, on the EMA weights) and resumed to 3. Records whether later compiles hit the cache."""
    d = tmp_path_factory.mktemp("lora")
    base = _np(world.params)
    straight = train(toy_config(3), d / "straight", world=world, progress=False)
    part = train(toy_config(2, **{"log.eval_every": 2}), d / "resumed", world=world, progress=False)
    resumed = train(toy_config(3), d / "resumed", world=world, progress=False)
    return SimpleNamespace(dir=d, straight=straight, part=part, resumed=resumed, base=base)


def test_toy_lora_run_state_checkpoint_and_resume(world, runs):
    state = runs.straight["state"]
    lora = lora_config(toy_config(1))
    paths = adapted_policy(world.policy(), lora, 0)[1]
    assert len(paths) == 10  # double blocks: img/txt qkv, out, mlp in/out; single blocks: linear1/2
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
    assert len(names) == 2 * len(paths) and all("lora_a" in n or "lora_b" in n for n in names)
    adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(state["params"])}
    assert {tuple(x.shape) for x in jax.tree.leaves(state["opt_state"]) if x.ndim} <= adapter_shapes
    # the checkpoint holds only adapters (params, EMA, optimizer moments)
    import orbax.checkpoint as ocp

    md = ocp.StandardCheckpointer().metadata(runs.dir / "straight" / "checkpoints" / "3" / "state").item_metadata
    assert set(md) == {"params", "ema", "opt_state", "step", "rng", "nonfinite"}
    ck_names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(md["params"])[0]]
    assert len(ck_names) == 2 * len(paths) and not any("kernel" in n for n in ck_names)
    # the caller's world (the base policy) is untouched by the LoRA runs
    for a, b in zip(runs.base, _np(world.params)):
        np.testing.assert_array_equal(a, b)
    # on-policy ratio exactly 1 before the first update, every iteration
    recs = [json.loads(x) for x in (runs.dir / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["ratio_dev_first_update"] == 0.0 for r in recs)
    # the adapters and their EMA moved, and resuming reproduces them bit for bit
    assert any(np.abs(x).max() > 0 for k, x in jax.tree_util.tree_leaves_with_path(state["params"])
               if "lora_b" in jax.tree_util.keystr(k))
    for key in ("params", "ema", "opt_state"):
        for a, b in zip(_np(state[key]), _np(runs.resumed["state"][key])):
            np.testing.assert_array_equal(a, b)
    # evaluation ran on the EMA weights of the LoRA policy; AOT compile reported
    evals = [json.loads(x) for x in (runs.dir / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/redness" in r for r in evals) == 2
    summary = json.loads((runs.dir / "straight" / "summary.json").read_text())
    assert summary["time/compile_s"] > 0 and summary["memory/argument_gib"] > 0


def test_later_compiles_hit_the_persistent_cache(runs):
    """The second and third runs compile the same step: XLA's executable comes from the cache."""
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("no persistent compilation cache configured")
    assert runs.part["compile/cache_hit"] == 1.0 and runs.resumed["compile/cache_hit"] == 1.0


def test_export_and_evaluate_merge_the_adapters(world, runs, tmp_path):
    from vipo_jax.evaluation import CheckpointSpec, restore_params
    from vipo_jax.evaluation.export import export_policy, load_exported
    from vipo_jax.evaluation.run import checkpoint_params
    from vipo_jax.models.flux.velocity import flux_velocity

    run = runs.dir / "straight"
    lora = lora_config(toy_config(1))
    rec = export_policy(run, tmp_path / "merged")
    rec_ema = export_policy(run, tmp_path / "merged_ema", use_ema=True)
    assert rec["step"] == 3 and rec["weights"] == "params" and rec_ema["weights"] == "ema"
    assert rec["lora"]["rank"] == RANK and rec["lora"]["scale"] == ALPHA / RANK
    for sub in ("vae", "dinov2", "clip", "classifier", "tokenizer"):  # a complete toy-assets folder
        assert (tmp_path / "merged" / sub).is_dir()
    merged, merged_ema = load_exported(tmp_path / "merged"), load_exported(tmp_path / "merged_ema")

    # kernels: W + s A B on adapted layers, bit-identical elsewhere
    trained, _ = restore_params(CheckpointSpec("r", str(run)), initial_adapters(world.policy(), lora))
    base = world.params
    m_flat = dict(nnx.to_flat_state(nnx.state(merged)))
    a = trained["transformer_blocks"]["img_attn"]["qkv"]
    w = np.asarray(base["transformer_blocks"]["img_attn"]["qkv"]["kernel"][...], np.float64)
    want = w + lora.scale * np.einsum("lir,lro->lio", np.asarray(a["lora_a"][...], np.float64),
                                      np.asarray(a["lora_b"][...], np.float64))
    got = np.asarray(m_flat[("transformer_blocks", "img_attn", "qkv", "kernel")][...])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, w)
    for key in [("x_embedder", "kernel"), ("proj_out", "kernel"), ("transformer_blocks", "img_mod", "kernel")]:
        np.testing.assert_array_equal(np.asarray(m_flat[key][...]), np.asarray(dict(nnx.to_flat_state(base))[key][...]))

    # the merged model's forward equals the unmerged base + adapters
    unmerged, _ = adapted_policy(world.policy(), lora, 0)
    nnx.update(unmerged, trained)
    x = jax.random.normal(jax.random.PRNGKey(0), (1,) + tuple(world.latent_shape))
    sigma = jnp.full((1,), 0.7)
    t5, pooled = jnp.asarray(world.train_prompts.cond["t5"][:1]), jnp.asarray(world.train_prompts.cond["pooled"][:1])
    g = jnp.full((1,), world.options.guidance, jnp.float32)
    fwd = jax.jit(lambda gd, st: flux_velocity(nnx.merge(gd, st), x, sigma, t5, pooled, g))
    v_unmerged = fwd(*nnx.split(unmerged))
    v_merged = fwd(*nnx.split(merged))
    v_base = fwd(*nnx.split(world.policy()))
    np.testing.assert_allclose(np.asarray(v_merged), np.asarray(v_unmerged), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(v_merged), np.asarray(v_base))

    # evaluation reads the same merged weights (and the EMA ones with ema=True)
    for spec, model in [(CheckpointSpec("r", str(run)), merged), (CheckpointSpec("e", str(run), ema=True), merged_ema)]:
        params, step, what = checkpoint_params(spec, world.policy(), base)
        assert step == 3 and what["lora_rank"] == RANK
        for p, q in zip(_np(params), _np(nnx.state(model))):
            np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
    assert not all(np.array_equal(p, q) for p, q in zip(_np(nnx.state(merged)), _np(nnx.state(merged_ema))))


def test_export_errors(runs, tmp_path):
    from vipo_jax.evaluation.export import export_policy

    with pytest.raises(CheckpointError, match="does not exist"):
        export_policy(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(CheckpointError, match="no checkpoints/ folder"):
        export_policy(tmp_path, tmp_path / "o")
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        export_policy(runs.dir / "straight", tmp_path / "o", step=7)


def test_targets_matching_no_layer_name_real_paths(world):
    c = toy_config(1, **{"lora.targets": "no_such_layer"})
    with pytest.raises(ConfigError, match=r"--config\.lora\.targets .*transformer_blocks"):
        world.with_lora(lora_config(c), c.seed)


@pytest.mark.slow
def test_compile_only_cli(runs, tmp_path):
    """`python -m vipo_jax.train --compile_only` builds, compiles, prints memory, writes nothing; a
    new process compiling the step the runs above compiled reads it from the persistent cache."""
    cmd = [sys.executable, "-m", "vipo_jax.train", "--config=configs/flux.py:toy", f"--workdir={tmp_path / 'w'}",
           "--compile_only", "--no_progress", "--config.sampling.prompts_per_iter=1",
           "--config.sampling.group_size=2", f"--config.lora.rank={RANK}", f"--config.lora.alpha={ALPHA}",
           f"--config.train.ema_decay={EMA}", "--config.optim.lr=1e-3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "VIPO_COMPILE_CACHE": str(ROOT / ".cache" / "jax")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "train step compiled in" in out.stdout and "per-device memory" in out.stdout, out.stdout
    assert "LoRA rank 2" in out.stdout
    assert "from the persistent compilation cache" in out.stdout, out.stdout
    assert not (tmp_path / "w").exists()  # nothing written
    r = subprocess.run([sys.executable, "-m", "vipo_jax.export", f"--workdir={tmp_path / 'none'}",
                        f"--out={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr
