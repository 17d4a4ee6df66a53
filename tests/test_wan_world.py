"""The Wan2.1 world: true classifier-free guidance (one batch, against a direct two-pass
computation), the on-policy ratio with CFG on, the video toy step with per-frame rewards and the
video PSM, WanPipeline-style prompt encoding and the negative-prompt cache, missing weights and
config errors, and (slow) the video toy run end to end through the CLI with GIF output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import wan
from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan.velocity import wan_velocity

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def tiny():
    model = WanTransformer(WanConfig.from_dict(TINY), rngs=nnx.Rngs(0))
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (3, 3, 4, 4, 4))
    text = jax.random.normal(k[1], (3, 5, 16)).at[:, 3:].set(0.0)  # zero-padded like WanPipeline
    neg = jnp.broadcast_to(jax.random.normal(k[2], (1, 5, 16)).at[:, 2:].set(0.0), (3, 5, 16))
    return model, x, jnp.asarray([0.9, 0.5, 0.2]), text, neg


def test_cfg_is_one_batch_and_matches_two_passes(tiny):
    model, x, sigma, text, neg = tiny
    graphdef, state = nnx.split(model)
    calls = []

    def counted(st, *a):
        calls.append(a[0].shape[0])  # traced once per model call: one call of 2B
        return nnx.merge(graphdef, st)(*a)

    class M:
        def __call__(self, *a):
            return counted(state, *a)

    v = jax.jit(lambda x_: wan_velocity(M(), x_, sigma, text, neg, 5.0))(x)
    assert calls == [6]
    t = sigma * 1000.0
    v_c, v_u = model(x, t, text), model(x, t, neg)
    assert_close(v, v_u + 5.0 * (v_c - v_u), rel=1e-5, what="CFG velocity")
    assert_close(wan_velocity(model, x, sigma, text), v_c, rel=1e-6, what="guidance off")


@pytest.mark.parametrize("uncond_grad", [False, True])
def test_cfg_gradient_of_the_unconditional_half(tiny, uncond_grad):
    """Default (as the official script): no gradient through the unconditional pass."""
    model, x, sigma, text, neg = tiny
    graphdef, state = nnx.split(model)
    w = jax.random.normal(jax.random.PRNGKey(9), x.shape)

    def loss(st, fn):
        return jnp.sum(fn(nnx.merge(graphdef, st)) * w)

    g = jax.grad(loss)(state, lambda m: wan_velocity(m, x, sigma, text, neg, 5.0, uncond_grad=uncond_grad))
    g_c = jax.grad(loss)(state, lambda m: m(x, sigma * 1000, text))
    g_u = jax.grad(loss)(state, lambda m: m(x, sigma * 1000, neg))
    want = jax.tree.map(lambda c, u: 5.0 * c + (-4.0 * u if uncond_grad else 0.0), g_c, g_u)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        assert_close(a, b, rel=1e-4, what="gradient")


# --- the video toy world -----------------------------------------------------------------------------
def toy_config(**over):
    c = wan.get_config("toy")
    c.sampling.prompts_per_iter = 1
    c.sampling.group_size = 4
    c.log.num_eval_prompts = 2
    c.log.tensorboard = False
    c.log.phase_times = False
    c.sampling.guidance = 5.0  # the toy default runs without CFG; these tests check the CFG path
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


@pytest.fixture(scope="module")
def toy_world():
    from vipo_jax.worlds import build_world

    return build_world(toy_config(**{"rewards.names": "redness,toy_clip", "rewards.coefs": "1.0,0.5"}))


@pytest.fixture(scope="module")
def toy_step(toy_world):
    from vipo_jax.training.optim import make_optimizer
    from vipo_jax.training.run import init_state

    c = toy_config()
    w = toy_world
    opt = make_optimizer(c)

    def make(step_cfg):
        from vipo_jax.training.step import train_step_for

        step = train_step_for(w, step_cfg, opt)
        return jax.jit(step, donate_argnums=0), init_state(w.params, opt, 0)

    return make


def test_toy_world_shapes_and_cfg(toy_world):
    w = toy_world
    assert w.latent_shape == (3, 8, 8, 8)
    assert w.options.guidance == 5.0 and not w.options.uncond_grad
    b = w.batch(np.array([0, 3]))
    assert b["cond"]["text"].shape == (2, 8, 64) and b["cond"]["neg"].shape == (2, 8, 64)
    np.testing.assert_array_equal(np.asarray(b["cond"]["neg"][0]), np.asarray(b["cond"]["neg"][1]))
    # the negative prompt "" is one end token, then zero vectors (WanPipeline's padding)
    neg = np.asarray(b["cond"]["neg"][0])
    assert np.abs(neg[0]).max() > 0 and np.abs(neg[1:]).max() == 0.0
    text = np.asarray(b["cond"]["text"][0])  # 7 words + end token fill all 8 positions
    assert np.abs(text).max(axis=-1).min() > 0
    monitored = {"redness", "subject_redness", "background_redness", "subject_fraction", "toy_clip", "digit_accuracy",
                 "digit_logprob", "digit_accuracy_eval"}
    assert set(w.rewards) == monitored
    assert set(w.metrics) == monitored | {"color_match"}


def test_video_toy_step_cfg_ratio_is_one_and_rewards_per_frame(toy_world, toy_step):
    """CFG on: rollout and training evaluate the same guided velocity, so the first update's ratio is
    exactly 1; the per-frame rewards are finite, the video PSM map is in [0, 1]."""
    w = toy_world
    from vipo_jax.training.step_config import StepConfig

    assert w.reward_weights == (("redness", 1.0), ("toy_clip", 0.5))
    step, state = toy_step(StepConfig.from_config(toy_config(**{"rewards.names": "redness,toy_clip",
                                                                 "rewards.coefs": "1.0,0.5"})))
    before = [np.array(x) for x in jax.tree.leaves(state["params"])]
    state, m = step(state, w.frozen, w.batch(np.array([5])))
    m = {k: float(v) for k, v in m.items()}
    assert m["ratio_dev_first_update"] == 0.0
    assert m["logp/rollout_gap"] < 1e-3
    assert m["updates_skipped"] == 0.0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    for k in ("reward/redness", "reward/toy_clip", "reward/digit_accuracy"):
        assert np.isfinite(m[k]), k
    assert 0.0 < m["map/mean"] < 1.0  # a spatio-temporal map, not the all-ones GRPO map
    after = [np.array(x) for x in jax.tree.leaves(state["params"])]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, after))


def test_video_feature_fn_per_frame(toy_world):
    w = toy_world
    videos = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 32, 32, 3))
    f = jax.jit(w.feature_fn)(w.frozen, videos)
    assert f.shape == (2, 9, 8, 8, 64)  # frames read at 64x64 by the 8x8-patch toy DINOv2
    one = jax.jit(w.feature_fn)(w.frozen, videos[:, 4:5])
    assert_close(f[:, 4:5], one, rel=1e-5, what="frame features independent of the other frames")


def test_video_rewards_average_frames(toy_world):
    from vipo_jax.rewards.frames import frame_indices, per_frame, per_frame_scores
    from vipo_jax.rewards.pixels import redness

    w = toy_world
    videos = jax.random.uniform(jax.random.PRNGKey(2), (3, 9, 32, 32, 3))
    batch = {"labels": jnp.asarray([[3, 0, 2], [5, 1, 8], [7, 2, 6]]),
             "clip_ids": jnp.asarray(w.train_prompts.inputs["clip_ids"][:3])}
    frames = [w.rewards["redness"](w.frozen, videos[:, t:t + 1], batch) for t in range(9)]
    assert_close(w.rewards["redness"](w.frozen, videos, batch), jnp.mean(jnp.stack(frames), 0), rel=1e-5)
    assert_close(per_frame(lambda f, im, b: redness(im))(None, videos, {}), jnp.mean(jnp.stack(frames), 0), rel=1e-5)
    # chunked over time (lax.map) = all at once; the stride keeps the first and last frames
    fn = lambda f, im, b: redness(im) * b["s"]  # noqa: E731
    s = {"s": jnp.asarray([1.0, 2.0, 3.0])}
    assert_close(per_frame_scores(fn, None, videos, s, frames_per_call=3), per_frame_scores(fn, None, videos, s),
                 rel=1e-6)
    assert frame_indices(9, 3) == (0, 3, 6, 8) and frame_indices(53, 4)[-1] == 52
    for name in ("toy_clip", "digit_accuracy"):
        r = w.rewards[name](w.frozen, videos, batch)
        assert r.shape == (3,) and bool(jnp.all(jnp.isfinite(r)))


# --- prompt encoding: WanPipeline semantics and the negative-prompt cache ---------------------------------
@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny random UMT5 (vipo_jax layout) and the toy T5-style tokenizer."""
    from vipo_jax.models.t5 import T5Config, T5Encoder
    from vipo_jax.text.tokenizers import load_tokenizer
    from vipo_jax.toy.tokenizer import make_t5_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    make_t5_tokenizer().save_pretrained(str(folder))
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, model_type="umt5")
    return T5Encoder(cfg, rngs=nnx.Rngs(3)), load_tokenizer(folder)


def test_wan_encoding_zero_pads_after_each_prompt(tiny_text):
    from vipo_jax.text.prompt_cache import PromptEncoder, wan_prompt_clean

    t5, tok = tiny_text
    enc = PromptEncoder(t5, None, tok, t5_max_length=8, t5_attention_mask=True, zero_pad=True,
                        clean=wan_prompt_clean)
    prompts = ["a red 3 on a blue background", "  a  red\n3 ", ""]
    emb, _, mask = enc.encode(prompts, return_mask=True)
    assert mask.sum(1).tolist() == [8, 4, 1]  # cleaned: "a red 3" + end token; "" is the end token only
    for e, n in zip(emb, mask.sum(1)):
        assert np.abs(e[:n]).max(-1).min() > 0 and np.abs(e[n:]).max(initial=0.0) == 0.0
    # = the masked encoder's states cut at each length (what WanPipeline computes)
    ids = np.asarray(tok(["a red 3"], padding="max_length", max_length=8)["input_ids"])
    m = (ids != 0).astype(np.int32)
    ref = np.asarray(t5(jnp.asarray(ids), jnp.asarray(m)))[0, :4]
    assert_close(emb[1, :4], ref, rel=1e-5, what="masked UMT5 states")
    assert wan_prompt_clean(" a &amp;amp; b\t\n c ") == "a & b c"
    plain = PromptEncoder(t5, None, tok, t5_max_length=8, t5_attention_mask=True)
    assert plain.fingerprint() != enc.fingerprint()


def test_negative_prompt_cache(tiny_text, tmp_path):
    from vipo_jax.text.prompt_cache import PromptEncoder
    from vipo_jax.worlds.build import cached_embeddings

    t5, tok = tiny_text
    loads = []

    def new_encoder():
        loads.append(1)
        return PromptEncoder(t5, None, tok, t5_max_length=8, t5_attention_mask=True, zero_pad=True)

    paths = {k: tmp_path / f"p.{k}.embeds.safetensors" for k in ("train", "eval", "neg")}
    sets = {"train": ["a red 3 on a blue background", "a green 7 on a white background"],
            "eval": ["a blue 1 on a black background"], "neg": [""]}
    first = cached_embeddings(sets, paths, new_encoder)
    assert len(loads) == 1 and all(p.is_file() for p in paths.values())
    neg = np.asarray(first["neg"].t5)
    assert neg.shape == (1, 8, 16) and np.abs(neg[0, 1:]).max() == 0.0
    again = cached_embeddings(sets, paths, new_encoder)
    assert len(loads) == 1  # every set read from its cache, no encoder loaded
    np.testing.assert_array_equal(np.asarray(again["neg"].t5), neg)
    # another negative prompt: only its cache is rebuilt (one encoder load)
    third = cached_embeddings({**sets, "neg": ["a red"]}, paths, new_encoder)
    assert len(loads) == 2
    assert np.abs(np.asarray(third["neg"].t5)[0, 2]).max() > 0 and np.abs(np.asarray(third["neg"].t5)[0, 3:]).max() == 0
    np.testing.assert_array_equal(np.asarray(third["train"].t5), np.asarray(first["train"].t5))


@pytest.mark.torch
def test_from_wan_matches_wan_pipeline(torch, tmp_path):
    """PromptEncoder.from_wan on a Wan folder's text_encoder/ (transformers UMT5EncoderModel) and
    tokenizer/ gives what diffusers' WanPipeline._get_t5_prompt_embeds gives."""
    import types

    import transformers as tf
    from diffusers import WanPipeline

    from vipo_jax.text.prompt_cache import PromptEncoder
    from vipo_jax.toy.tokenizer import make_t5_tokenizer

    torch.manual_seed(0)
    model = tf.UMT5EncoderModel(tf.UMT5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                              relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                              feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    model.save_pretrained(tmp_path / "text_encoder")
    make_t5_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    tok = tf.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    prompts = ["a red 3 on a blue background", " a  green\n7 ", ""]
    ours = PromptEncoder.from_wan(tmp_path, param_dtype="float32", dtype="float32", max_sequence_length=12)
    stub = types.SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ref = WanPipeline._get_t5_prompt_embeds(stub, prompts, max_sequence_length=12, device=torch.device("cpu"),
                                                dtype=torch.float32).numpy()
    got = ours.encode(prompts)[0]
    assert got.shape == (3, 12, 16)
    assert_close(got, ref, rel=1e-4, what="from_wan vs WanPipeline")


# --- errors ------------------------------------------------------------------------------------------------
def test_missing_weights_say_what_to_download(tmp_path):
    from vipo_jax.worlds import build_world

    c = wan.get_config("")
    with pytest.raises(CheckpointError, match=r"huggingface-cli download Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers"):
        build_world(c)
    c.model.path = str(tmp_path)
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match="missing transformer, text_encoder, tokenizer"):
        build_world(c)
    c14 = wan.get_config("14b")
    with pytest.raises(CheckpointError, match="Wan2.1-T2V-14B-Diffusers"):
        build_world(c14)
    for d in ("transformer", "text_encoder", "tokenizer"):
        (tmp_path / d).mkdir()
    with pytest.raises(CheckpointError, match="DINOv2 backbone folder not found"):
        build_world(c)
    c.psm.enabled = False
    with pytest.raises(DataError, match="data.prompts is empty"):
        build_world(c)


def test_rewards_the_video_toy_world_cannot_score_are_config_errors():
    from vipo_jax.worlds import build_world

    c = toy_config(**{"rewards.names": "hpsv21"})
    with pytest.raises(ConfigError, match="not available in the toy world"):
        build_world(c)  # before any weights are looked for


@pytest.mark.parametrize("key,value,match", [
    ("sampling.num_frames", 52, "1 \\+ 4k frames"),
    ("sampling.guidance", -1.0, "guidance=-1.0 must be >= 0"),
    ("model.variant", "dev", "not a wan variant"),
    ("rewards.frame_stride", 0, "frame_stride=0"),
    ("sampling.fps", 0.0, "fps=0.0"),
])
def test_video_config_validation(key, value, match):
    from vipo_jax.training.checks import check_config as validate

    c = wan.get_config("")
    validate(c)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_toy_world_refuses_other_sizes():
    from vipo_jax.worlds import build_world

    with pytest.raises(ConfigError, match="9 frames of 32x32"):
        build_world(toy_config(**{"sampling.num_frames": 13}))


# --- the CLI, end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_video_toy_cli_writes_gifs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vipo_jax.train", "--config=configs/wan.py:toy", f"--workdir={tmp_path / 'run'}",
         "--config.train.iterations=3", "--config.sampling.prompts_per_iter=1", "--config.sampling.group_size=4",
         "--config.log.eval_every=2", "--config.log.num_eval_prompts=2", "--config.log.tensorboard=False",
         "--no_progress"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run = tmp_path / "run"
    gifs = sorted(p.name for p in (run / "samples").glob("*.gif"))
    assert gifs == ["eval_000000.gif", "eval_000002.gif", "eval_000003.gif"], gifs
    from PIL import Image

    with Image.open(run / "samples" / "eval_000003.gif") as im:
        assert im.n_frames == 9 and im.is_animated
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["ratio_dev_first_update"] == 0.0 for r in train)
    assert any("eval/digit_accuracy" in r for r in recs)
    s = json.loads((run / "summary.json").read_text())
    assert s["iterations"] == 3 and "reward/redness/first10pct" in s
