"""Config validation: every bad value fails before any model is loaded, with a message that names
the option (as it is spelled on the command line) and what would be valid."""

from __future__ import annotations

import ml_collections as mlc

from vipo_jax.errors import ConfigError

KNOWN_REWARDS = ("hpsv21", "pickscore", "clip_score", "image_reward", "redness", "toy_clip", "videoalign_vq",
                 "videoalign_mq")
#: model.variant per model.family: FLUX.1 dev / schnell, Wan2.1 T2V 1.3B / 14B.
VARIANTS = {"flux": ("dev", "schnell"), "wan": ("1.3b", "14b")}
CHOICES = {
    "world": ("real", "toy"),
    "model.family": tuple(VARIANTS),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots", "save_all_dots", "offload_dots"),
    "train.logprob_reduction": ("position_sum", "sample_mean"),
    "train.map_target": ("advantage", "reward"),
    "psm.sign_rule": ("border", "sklearn_u", "sklearn_v"),
    "psm.aggregation": ("weighted", "average", "first_pc", "uniform"),
}


def _get(c: mlc.ConfigDict, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def reward_spec(c: mlc.ConfigDict) -> list[tuple[str, float]]:
    names = [n.strip() for n in str(c.rewards.names).split(",") if n.strip()]
    coefs = [s.strip() for s in str(c.rewards.coefs).split(",") if s.strip()]
    if not names:
        raise ConfigError("--config.rewards.names is empty: name at least one reward")
    for n in names:
        if n not in KNOWN_REWARDS:
            raise ConfigError(f"--config.rewards.names: unknown reward {n!r}; known: {', '.join(KNOWN_REWARDS)}")
    if len(coefs) != len(names):
        raise ConfigError(f"--config.rewards.coefs has {len(coefs)} values for {len(names)} rewards ({names})")
    try:
        vals = [float(x) for x in coefs]
    except ValueError as e:
        raise ConfigError(f"--config.rewards.coefs must be numbers: {c.rewards.coefs!r}") from e
    return list(zip(names, vals))


def _validate_video(c: mlc.ConfigDict) -> None:
    """The Wan settings: clip length, classifier-free guidance, per-frame scoring."""
    s = c.sampling
    if s.num_frames < 1 or (s.num_frames - 1) % 4:
        raise ConfigError(f"--config.sampling.num_frames={s.num_frames}: the Wan VAE takes 1 + 4k frames "
                          "(e.g. 53 in the ViPO recipe, 81 in Wan2.1's default)")
    if s.guidance < 0:
        raise ConfigError(f"--config.sampling.guidance={s.guidance} must be >= 0 (true CFG scale; <= 1 turns "
                          "the unconditional pass off)")
    if not isinstance(s.negative_prompt, str):
        raise ConfigError("--config.sampling.negative_prompt must be a string (\"\" for none)")
    if s.fps <= 0:
        raise ConfigError(f"--config.sampling.fps={s.fps} must be > 0 (frame rate of the saved GIFs)")
    if c.psm.frames_per_call < 0 or c.rewards.frames_per_call < 0:
        raise ConfigError("--config.psm.frames_per_call and --config.rewards.frames_per_call must be >= 0 (0: all "
                          "frames of a video in one call)")
    if c.rewards.frame_stride < 1:
        raise ConfigError(f"--config.rewards.frame_stride={c.rewards.frame_stride} must be >= 1")


def validate(c: mlc.ConfigDict) -> None:
    for key, choices in CHOICES.items():
        v = _get(c, key)
        if v not in choices:
            raise ConfigError(f"--config.{key}={v!r} is not one of {', '.join(choices)}")
    if c.model.variant not in VARIANTS[c.model.family]:
        raise ConfigError(f"--config.model.variant={c.model.variant!r} is not a {c.model.family} variant: "
                          f"use one of {', '.join(VARIANTS[c.model.family])}")
    s, t = c.sampling, c.train
    if s.group_size < 2:
        raise ConfigError(f"--config.sampling.group_size={s.group_size}: GRPO needs at least 2 "
                          "generations per prompt to compute a group-relative advantage")
    if s.prompts_per_iter < 1:
        raise ConfigError(f"--config.sampling.prompts_per_iter={s.prompts_per_iter} must be >= 1")
    if s.height % 16 or s.width % 16 or s.height <= 0 or s.width <= 0:
        raise ConfigError(f"resolution {s.height}x{s.width}: height and width must be positive "
                          "multiples of 16 (VAE downsampling x 2x2 latent packing)")
    if not 1 <= s.max_text_len <= 512:
        raise ConfigError(f"--config.sampling.max_text_len={s.max_text_len}: the T5 prompt length must be "
                          "in 1..512 (FLUX.1: 512 for dev, 256 for schnell; Wan2.1: 512)")
    if c.model.family == "wan":
        _validate_video(c)
    if s.num_steps < 2:
        raise ConfigError(f"--config.sampling.num_steps={s.num_steps} must be >= 2 (the last step is never trained)")
    if s.shift <= 0:
        raise ConfigError(f"--config.sampling.shift={s.shift} must be > 0")
    if s.eta <= 0:
        raise ConfigError(f"--config.sampling.eta={s.eta} must be > 0: with eta=0 the sampler is "
                          "deterministic and has no log-probability to train")
    if not 0 < t.timestep_fraction <= 1:
        raise ConfigError(f"--config.train.timestep_fraction={t.timestep_fraction} must be in (0, 1]")
    if int((s.num_steps - 1) * t.timestep_fraction) < 1:
        raise ConfigError(f"timestep_fraction {t.timestep_fraction} x (num_steps-1={s.num_steps - 1}) "
                          "trains no timestep: raise one of them")
    batch = s.prompts_per_iter * s.group_size
    if t.num_updates < 1 or batch % t.num_updates:
        raise ConfigError(f"--config.train.num_updates={t.num_updates} must divide the "
                          f"iteration's {batch} samples (prompts_per_iter x group_size)")
    chunk = batch // t.num_updates
    if t.micro_batch < 0 or (t.micro_batch and chunk % t.micro_batch):
        raise ConfigError(f"--config.train.micro_batch={t.micro_batch} must divide the {chunk} "
                          "samples of one update")
    if t.clip_range <= 0 or t.adv_clip_max <= 0:
        raise ConfigError("--config.train.clip_range and adv_clip_max must be > 0")
    if t.iterations < 1:
        raise ConfigError(f"--config.train.iterations={t.iterations} must be >= 1")
    if t.max_nonfinite < 1:
        raise ConfigError("--config.train.max_nonfinite must be >= 1")
    o = c.optim
    if not o.lr > 0:
        raise ConfigError(f"--config.optim.lr={o.lr} must be > 0")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError("--config.optim.b1/b2 must be in [0, 1)")
    if o.grad_clip <= 0 or o.weight_decay < 0:
        raise ConfigError("--config.optim.grad_clip must be > 0 and weight_decay >= 0")
    p = c.psm
    if not 1 <= p.num_components <= 16:
        raise ConfigError(f"--config.psm.num_components={p.num_components} must be in 1..16")
    if p.smooth_sigma < 0:
        raise ConfigError(f"--config.psm.smooth_sigma={p.smooth_sigma} must be >= 0")
    if c.log.every < 1 or c.log.eval_every < 0 or c.log.ckpt_every < 0:
        raise ConfigError("--config.log.every must be >= 1; eval_every and ckpt_every >= 0 (0: off)")
    reward_spec(c)
    _validate_lora_ema(c)


def _validate_lora_ema(c: mlc.ConfigDict) -> None:
    """LoRA rank / alpha / targets and the EMA decay (sections absent in older configs: off). Whether
    the targets match any layer is checked when the adapters are attached (that error names real
    layer paths)."""
    decay = c.train.get("ema_decay", 0.0)
    if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"--config.train.ema_decay={decay!r} must be in [0, 1) (0: no EMA; e.g. 0.99 averages "
                          "about the last 100 iterations)")
    lora = c.get("lora")
    if lora is None:
        return
    rank, alpha = lora.get("rank", 0), lora.get("alpha", 0.0)
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"--config.lora.rank={rank!r} must be an integer >= 0 (0: LoRA off, full fine-tuning)")
    if not isinstance(alpha, (int, float)) or alpha < 0:
        raise ConfigError(f"--config.lora.alpha={alpha!r} must be >= 0 (scale alpha / rank; 0: alpha = rank)")
    if not isinstance(lora.get("targets", ""), str):
        raise ConfigError("--config.lora.targets must be a string of comma-separated regular expressions")
    if rank > 0:
        from vipo_jax.training.adapters import lora_config

        try:
            lora_config(c)  # compiles the patterns
        except ConfigError as e:
            raise ConfigError(f"--config.{e}") from None
