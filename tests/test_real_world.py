"""End to end in the real world (``world="real"``) on a tiny FLUX.1 pipeline folder written by the
reference libraries in the real on-disk layout (diffusers FluxPipeline.save_pretrained: transformer/,
vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json; bf16
weights as FLUX.1-dev ships them), a transformers DINOv2 folder as the PSM backbone and a
transformers CLIPModel folder as the PickScore reward: train, the prompt-embedding cache, resume,
and the data / checkpoint errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from configs import flux
from pytorch_reference.reference_pipelines import clip_text_config, write_clip_model, write_dinov2, write_flux_pipeline
from vipo_jax.errors import CheckpointError, DataError

pytestmark = [pytest.mark.slow, pytest.mark.torch]

PROMPTS = ["a red 3 on a blue background", "a green 7 on a white background", "a blue 1 on a black background",
           "a yellow 5 on a gray background", "a cyan 0 on a magenta background", "a white 8 on a red background"]
T5_DIM, CLIP_DIM = 32, 24
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
                   guidance_embeds=True, axes_dims_rope=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
           norm_num_groups=4, latent_channels=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
              patch_size=14)
PICKSCORE_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def assets(torch, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("real_world")
    root = base / "FLUX.1-tiny"
    # bf16 weights, as FLUX.1-dev ships them
    write_flux_pipeline(torch, root, transformer=TRANSFORMER, vae=VAE, t5_dim=T5_DIM, clip_dim=CLIP_DIM,
                        dtype="bfloat16", seed=0)
    write_dinov2(torch, base / "dinov2", config=DINOV2, seed=1)
    write_clip_model(torch, base / "pickscore", text=clip_text_config(32, intermediate_size=37),
                     vision=PICKSCORE_VISION, projection_dim=16, seed=2)
    return {"base": base, "root": root, "dinov2": base / "dinov2", "pickscore": base / "pickscore"}


def tiny_config(assets: dict, prompts: Path, iterations: int, root: Path | None = None):
    c = flux.get_config("")  # the FLUX.1-dev recipe, made tiny
    c.world = "real"
    c.model.path = str(root or assets["root"])
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.sampling.height = c.sampling.width = 64  # 8x8 latent, 4x4 tokens
    c.sampling.num_steps = 4
    c.sampling.group_size = 2
    c.sampling.prompts_per_iter = 2
    c.sampling.max_text_len = 8
    c.rewards.names = "pickscore"
    c.rewards.coefs = "1.0"
    c.rewards.pickscore = str(assets["pickscore"])
    c.psm.backbone = str(assets["dinov2"])
    c.data.prompts = str(prompts)
    c.data.cache_dir = str(prompts.parent / "tfds")
    c.train.iterations = iterations
    c.log.eval_every = 2
    c.log.num_eval_prompts = 2
    c.log.tensorboard = False
    return c


def _prompts_file(folder: Path, prompts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def _train_records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_train_cache_and_resume(assets, tmp_path, monkeypatch, capsys):
    from vipo_jax.text.prompt_cache import PromptEncoder, load_cache
    from vipo_jax.training.run import train

    prompts = _prompts_file(tmp_path / "data", PROMPTS)
    out = train(tiny_config(assets, prompts, 2), tmp_path / "run", progress=False)
    assert out["iterations"] == 2
    recs = _train_records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["loss"] is not None and math.isfinite(r["loss"]), r
        assert r["ratio_dev_first_update"] == 0.0, r  # on-policy: importance ratio exactly 1
        assert r["updates_skipped"] == 0.0, r
        assert math.isfinite(r["reward/pickscore"]), r
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval/pickscore" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert (tmp_path / "run" / "samples" / "eval_000002.png").is_file()

    cache = prompts.with_name("prompts.flux-dev-8-float32.embeds.safetensors")
    assert cache.is_file() and prompts.with_name("prompts.flux-dev-8-float32-eval.embeds.safetensors").is_file()
    emb = load_cache(cache, PROMPTS)
    assert emb.t5.shape[:2] == (len(PROMPTS), 8) and emb.t5.shape[2] == T5_DIM
    assert emb.pooled.shape == (len(PROMPTS), CLIP_DIM)

    # resume to 3 iterations: from the checkpoint, with the cached embeddings (no text encoder)
    mtime = cache.stat().st_mtime_ns

    def no_encoder(*a, **k):
        raise AssertionError("the prompt cache should have been reused")

    monkeypatch.setattr(PromptEncoder, "from_flux", classmethod(no_encoder))
    out = train(tiny_config(assets, prompts, 3), tmp_path / "run", progress=False)
    assert out["iterations"] == 3
    assert "at iteration 2" in capsys.readouterr().out  # resumed, not restarted
    assert [r["step"] for r in _train_records(tmp_path / "run")] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in _train_records(tmp_path / "run"))
    assert cache.stat().st_mtime_ns == mtime


def test_empty_prompts_file_is_a_data_error(assets, tmp_path):
    from vipo_jax.training.run import train

    prompts = _prompts_file(tmp_path, ["", "   "])
    with pytest.raises(DataError, match="empty"):
        train(tiny_config(assets, prompts, 1), tmp_path / "run", progress=False)


def test_truncated_transformer_is_a_checkpoint_error(assets, tmp_path):
    from vipo_jax.training.run import train

    root = tmp_path / "FLUX.1-tiny"
    shutil.copytree(assets["root"], root)
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    prompts = _prompts_file(tmp_path / "data", PROMPTS[:2])
    with pytest.raises(CheckpointError, match=r"transformer/diffusion_pytorch_model\.safetensors is truncated"):
        train(tiny_config(assets, prompts, 1, root=root), tmp_path / "run", progress=False)


@pytest.mark.parametrize("length", [0, 513])
def test_max_text_len_out_of_range_is_a_config_error(length):
    from vipo_jax.errors import ConfigError
    from vipo_jax.training.checks import check_config as validate

    c = flux.get_config("")
    c.sampling.max_text_len = length
    with pytest.raises(ConfigError, match="max_text_len"):
        validate(c)


def test_image_reward_is_scored_by_evaluation(assets, torch, tmp_path):
    """ImageReward (a converted THUDM-layout checkpoint with its BERT tokenizer) joins the real world's
    rewards when evaluate gives it a path: the world scores it with the prompt's BLIP tokens, as the
    standalone scorer does."""
    import numpy as np

    from tests.test_image_reward import write_reference
    from vipo_jax.rewards.image_reward import ImageRewardScorer
    from vipo_jax.worlds import build_world

    (tmp_path / "ir").mkdir()
    write_reference(torch, tmp_path / "ir")
    c = tiny_config(assets, _prompts_file(tmp_path / "data", PROMPTS[:2]), 1)
    c.rewards.image_reward = str(tmp_path / "ir" / "converted")
    world = build_world(c, evaluation=True)
    # the backbone loads too: evaluate writes the PSM maps of its samples
    assert list(world.metrics) == ["pickscore", "image_reward"] and world.has_backbone
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    got = world.eval_metrics(images)
    want = ImageRewardScorer.from_folder(c.rewards.image_reward).score(images, list(world.eval_prompts.prompts))
    assert abs(got["image_reward"] - float(np.mean(want))) < 1e-4
    assert np.isfinite(got["pickscore"])


def test_bfl_single_file_trains_through_the_cli(assets, tmp_path):
    """The transformer as a BFL single file (the layout of flux1-dev.safetensors) given by
    --config.model.transformer, the rest from the diffusers folder: the CLI trains it, on-policy."""
    import subprocess
    import sys

    from vipo_jax.models.flux import from_pretrained as load_flux_transformer
    from vipo_jax.models.flux.export import save_bfl
    from vipo_jax.weights.safetensors_io import open_checkpoint

    bfl = tmp_path / "flux1-tiny.safetensors"
    save_bfl(load_flux_transformer(assets["root"] / "transformer"), bfl)
    assert "double_blocks.0.img_attn.qkv.weight" in open_checkpoint(bfl)  # the BFL key layout
    prompts = _prompts_file(tmp_path / "data", PROMPTS[:2])
    c = tiny_config(assets, prompts, 2)
    args = [f"--config.{k}={v}" for k, v in {
        "model.path": c.model.path, "model.transformer": bfl, "model.dtype": "float32", "model.remat": "none",
        "sampling.height": 64, "sampling.width": 64, "sampling.num_steps": 4, "sampling.group_size": 2,
        "sampling.prompts_per_iter": 2, "sampling.max_text_len": 8, "rewards.names": "pickscore",
        "rewards.pickscore": assets["pickscore"], "psm.backbone": assets["dinov2"], "data.prompts": prompts,
        "data.cache_dir": tmp_path / "tfds", "train.iterations": 2, "log.eval_every": 0,
        "log.tensorboard": False}.items()]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "vipo_jax.train", "--config=configs/flux.py",
                          f"--workdir={tmp_path / 'run'}", "--no_progress", *args], cwd=root, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    recs = _train_records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2] and all(r["ratio_dev_first_update"] == 0.0 for r in recs)
