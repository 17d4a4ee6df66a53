"""ViPO on Wan2.1 text-to-video.

COMMAND:
  # the embedded video toy world (moving digits; CPU, minutes):
  python -m vipo_jax.train --config=configs/wan.py:toy --workdir=runs/wan_toy
  # plain GRPO (DanceGRPO) baseline in the video toy world:
  python -m vipo_jax.train --config=configs/wan.py:toy --config.psm.enabled=False --workdir=runs/wan_toy_grpo
  # the paper's Wan2.1-T2V-1.3B recipe (docs/METHOD.md §5) from a local diffusers folder:
  python -m vipo_jax.train --config=configs/wan.py --config.model.path=/path/to/Wan2.1-T2V-1.3B-Diffusers \
      --config.psm.backbone=/path/to/dinov2-large --config.rewards.videoalign=/path/to/VideoReward \
      --config.data.prompts=prompts.txt --workdir=runs/wan

Arguments after the colon: "toy" (embedded video toy world), "" or "1.3b" (Wan2.1-T2V-1.3B recipe),
"14b" (the same recipe on Wan2.1-T2V-14B), "official" (the 1.3B recipe with the official ViPO Wan
script's behaviours; its HPS path also puts the map on the reward: --config.train.map_target=
reward_and_advantage --config.rewards.names=hpsv21).

Rewards: the paper trains Wan with VideoAlign's VQ + MQ heads (coefficients 1, 1), the default here:
``--config.rewards.videoalign=<KlingTeam/VideoReward folder>`` (without it the run stops at once and
says what to download; docs/VIDEOALIGN.md). Image rewards are scored per frame and averaged over
frames instead, e.g. ``--config.rewards.names=hpsv21 --config.rewards.coefs=1.0``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections as mlc


def _flux_module():
    """configs/flux.py, loaded from beside this file (whatever the working directory)."""
    spec = importlib.util.spec_from_file_location("_vipo_configs_flux", Path(__file__).with_name("flux.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flux_config() -> mlc.ConfigDict:
    """configs/flux.py's FLUX.1-dev config: the sections both families share (train, optim, psm,
    data, log, mesh, sharding)."""
    return _flux_module().get_config("")


def _common() -> mlc.ConfigDict:
    c = _flux_config()
    c.model.family = "wan"
    c.model.path = ""  # a diffusers Wan2.1 T2V folder (transformer/, vae/, text_encoder/, tokenizer/)
    c.model.variant = "1.3b"  # 1.3b | 14b
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "bfloat16"  # compute
    c.model.remat = "full"

    s = c.sampling
    s.height = 240
    s.width = 416
    s.num_frames = 53  # 1 + 4k: 14 latent frames
    s.fps = 16.0  # of the saved GIFs (Wan2.1 generates at 16 fps)
    s.num_steps = 16
    s.shift = 8.0
    s.eta = 0.25
    s.guidance = 5.0  # true classifier-free guidance, rollout and training; <= 1: off
    # Wan2.1's default negative prompt (the ViPO Wan script's); "" is diffusers' WanPipeline default.
    from vipo_jax.models.wan.config import NEGATIVE_PROMPT

    s.negative_prompt = NEGATIVE_PROMPT
    s.cfg_uncond_grad = False  # False: no gradient through the unconditional half (as the official script)
    s.group_size = 8
    s.prompts_per_iter = 8
    s.init_same_noise = True
    s.max_text_len = 512  # UMT5 positions (WanPipeline: 512, zero vectors after each prompt)

    c.train.iterations = 300
    c.optim.lr = 5e-6

    c.psm.frames_per_call = 0  # DINOv2 frames per video per call (0: all; lower it to save memory)

    c.rewards.names = "videoalign_vq,videoalign_mq"  # the paper's VideoAlign visual + motion quality
    c.rewards.coefs = "1.0,1.0"
    c.rewards.videoalign = ""  # the KlingTeam/VideoReward folder (model_config.json, checkpoint-N/, base/)
    c.rewards.videoalign_base = ""  # the Qwen2-VL-2B-Instruct folder when not <videoalign>/base
    # VideoAlign samples 2 frames per second of the clip at this frame rate (0: sampling.fps, 16 for
    # Wan2.1: 6 of 53 frames; the official ViPO script writes its mp4s at 25 fps: 4 frames)
    c.rewards.videoalign_fps = 0.0
    c.rewards.videoalign_clips_per_call = 0  # clips per VideoAlign call (0: all; lower it to save memory)
    c.rewards.clip_tokenizer = ""  # CLIP tokenizer folder for the CLIP-family rewards' prompts (required)
    c.rewards.frame_stride = 1  # score every k-th frame (and the last)
    c.rewards.frames_per_call = 0  # reward-model frames per video per call (0: all)

    c.log.eval_every = 50
    c.log.num_eval_prompts = 4
    return c


def _toy(c: mlc.ConfigDict) -> mlc.ConfigDict:
    c.world = "toy"
    c.model.path = ""  # empty: the video toy checkpoints shipped in vipo_jax/toy/assets/video
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    s = c.sampling
    s.height = 32
    s.width = 32
    s.num_frames = 9  # 3 latent frames of 8x8
    s.fps = 6.0
    s.num_steps = 8
    s.shift = 3.0  # a small latent: the image toy world's shift
    s.eta = 0.25
    # No CFG in the toy default: with guidance 5 the toy's redness reward fell instead of rising
    # (lr 5e-5 and 2e-4, with or without the gradient through the unconditional half; see
    # benchmarks/RESULTS.md). The CFG path is exercised by the tests at 5.0 and by the real recipe;
    # --config.sampling.guidance=5.0 turns it on here.
    s.guidance = 1.0
    s.negative_prompt = ""  # the toy tokenizer knows only caption words; the toy DiT learned "" as unconditional
    s.group_size = 8
    s.prompts_per_iter = 4
    s.max_text_len = 8
    c.train.iterations = 100
    c.optim.lr = 5e-5
    c.rewards.names = "redness"
    c.rewards.coefs = "1.0"
    c.log.eval_every = 25
    c.log.num_eval_prompts = 8
    c.log.ckpt_every = 20
    return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    c = _common()
    arg = (arg or "").strip().lower()
    if arg == "toy":
        return _toy(c)
    if arg == "14b":
        c.model.variant = "14b"
        return c
    if arg == "official":  # the official ViPO Wan script's behaviours (configs/flux.py official())
        _flux_module().official(c)
        c.rewards.videoalign_fps = 25.0  # it writes its mp4s at 25 fps: VideoAlign reads 4 of 53 frames
        return c
    if arg not in ("", "1.3b"):
        raise ValueError(f"configs/wan.py: unknown argument {arg!r}; use toy, 1.3b, 14b or official")
    return c
