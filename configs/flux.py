"""ViPO on FLUX.1.

COMMAND:
  # the embedded toy world (CPU, minutes):
  python -m vipo_jax.train --config=configs/flux.py:toy --workdir=runs/toy
  # plain GRPO (DanceGRPO) baseline in the toy world:
  python -m vipo_jax.train --config=configs/flux.py:toy --config.psm.enabled=False --workdir=runs/toy_grpo
  # LoRA (rank 16 on the attention and MLP projections) with an EMA of the adapters:
  python -m vipo_jax.train --config=configs/flux.py:toy --config.lora.rank=16 --config.train.ema_decay=0.99 \
      --workdir=runs/toy_lora
  # the paper's FLUX.1-dev recipe (docs/METHOD.md §5) from a local diffusers folder:
  python -m vipo_jax.train --config=configs/flux.py --config.model.path=/path/to/FLUX.1-dev \
      --config.data.prompts=prompts.txt --workdir=runs/flux

Arguments after the colon: "toy" (embedded toy world), "" (FLUX.1-dev recipe), "schnell", "official"
(the FLUX.1-dev recipe with the official ViPO code's behaviours, see ``official``), "toy_official".
"""

from __future__ import annotations

import ml_collections as mlc


def _common() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 42
    # where the weights come from: "real" (the folders users download), "toy" (the committed toy
    # checkpoints) or "random" (random weights at the recipe's shapes: timing and memory benchmarks)
    c.world = "real"

    c.model = mlc.ConfigDict()
    c.model.family = "flux"
    c.model.path = ""  # a diffusers FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/)
    c.model.variant = "dev"  # dev (embedded guidance) | schnell
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "bfloat16"  # compute
    c.model.remat = "full"
    c.model.attention = "xla"
    # the DiT's timestep: "exact" (1000 sigma) or "floor" (int(1000 sigma), as the official scripts)
    c.model.timestep_rounding = "exact"
    # The transformer's weights when not <path>/transformer: a diffusers transformer folder or the BFL
    # single file (flux1-dev.safetensors, the layout ComfyUI and the BFL code load).
    c.model.transformer = ""
    # world="random" / the planner: architecture fields replaced in the preset, e.g. "num_layers=2"
    c.model.arch = ""

    c.sampling = mlc.ConfigDict()
    c.sampling.height = 512
    c.sampling.width = 512
    c.sampling.num_steps = 8
    c.sampling.shift = 3.0
    c.sampling.eta = 0.3
    c.sampling.guidance = 3.5  # embedded guidance (dev); ignored for schnell
    c.sampling.group_size = 12  # G generations per prompt
    c.sampling.prompts_per_iter = 8  # prompts per iteration over all devices
    c.sampling.init_same_noise = True
    c.sampling.max_text_len = 512
    # Faster iterations (MixGRPO): the SDE only in a window of this many transitions, ODE steps
    # elsewhere (0: the SDE on every trainable transition, the paper's recipe). The window slides by
    # window_stride every window_every iterations (or: window_schedule = "random"); ode_solver is
    # euler | dpm2 (DPM-Solver++(2M), MixGRPO-Flash) | ab2 outside the window.
    c.sampling.sde_window = 0
    c.sampling.window_schedule = "sliding"
    c.sampling.window_stride = 1
    c.sampling.window_every = 25
    c.sampling.ode_solver = "euler"
    # the last step (never trained) sampled with the SDE as the official scripts do (default: the ODE)
    c.sampling.stochastic_last_step = False

    c.train = mlc.ConfigDict()
    c.train.iterations = 300
    c.train.timestep_fraction = 0.6
    c.train.window_fraction = 1.0  # with sampling.sde_window: the share of the window's transitions trained
    # GRPO-Guard's RatioNorm of each transition's log-ratio (off: the paper's ratio), with its 1/dt
    # loss weights normalised to mean 1 (ratio_norm_reweight)
    c.train.ratio_norm = False
    c.train.ratio_norm_reweight = True
    c.train.num_updates = 1  # optimizer updates per iteration (samples split in this many chunks)
    c.train.micro_batch = 0  # samples per forward in rollout and training (0: all of a chunk)
    c.train.clip_range = 1e-4
    c.train.adv_clip_max = 5.0
    c.train.logprob_reduction = "position_sum"  # position_sum | sample_mean
    c.train.map_target = "advantage"  # advantage | reward (ablation) | reward_and_advantage (official Wan + HPS)
    c.train.max_nonfinite = 3  # consecutive skipped updates before the run stops
    # Exponential moving average of the trained weights (the adapters under LoRA), kept in float32,
    # updated once per iteration after its optimizer updates; checkpointed. 0: off.
    c.train.ema_decay = 0.0

    # LoRA fine-tuning: rank 0 = off (full fine-tuning). With rank > 0 only the adapters are trained,
    # held by the optimizer and written to the checkpoints; the base weights stay frozen.
    c.lora = mlc.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 0.0  # scale = alpha / rank; 0: alpha = rank (scale 1)
    # Comma-separated regular expressions searched in the policy's layer paths. Empty: the family's
    # lora_targets (vipo_jax/worlds/flux.py, wan.py), the attention and MLP projections:
    # Flux "_attn\.qkv$,_attn_out$,_mlp\.linear_(in|out)$,single_transformer_blocks\.linear[12]$";
    # Wan "attn[12]\.to_(q|k|v|out)$,ffn\.linear_(in|out)$".
    c.lora.targets = ""

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip = 1.0

    c.psm = mlc.ConfigDict()
    c.psm.enabled = True
    # the PSM backbone (vipo_jax.backbones): dinov2 (the paper's) | resnet | sam | pixels | latents
    c.psm.backbone_kind = "dinov2"
    c.psm.backbone = ""  # its weights: a transformers folder (facebook/dinov2-large, microsoft/resnet-50, ...)
    c.psm.backbone_layer = ""  # resnet: the stage whose feature map is read ("": stage3)
    c.psm.backbone_size = 0  # resnet: resize the image to this side first (0: as generated)
    c.psm.patch = 0  # pixels / latents: the patch the features are averaged over (0: pixels 4, latents 1)
    # dinov2 input: "resize" (to a multiple of the patch, float) or "crop_uint8" (the official code's:
    # uint8 levels, no resize, the remainder of the patch grid dropped)
    c.psm.backbone_input = "resize"
    # "always" map the decoder's [-1, 1] to [0, 1], or "if_negative" (only when its minimum is < 0: official)
    c.psm.rescale_rule = "always"
    c.psm.num_components = 3
    c.psm.sign_rule = "border"  # border | sklearn_u | sklearn_v
    c.psm.aggregation = "weighted"  # weighted | average | first_pc | uniform
    c.psm.smooth_sigma = 1.0
    c.psm.normalize_mean = False
    # controls that can falsify the map: none | inverted (1 - M) | mean_map (the batch mean for every
    # sample) | shuffled (another prompt's map)
    c.psm.control = "none"

    c.rewards = mlc.ConfigDict()
    # comma-separated names from the reward registry (vipo_jax.rewards): hpsv21, pickscore, clip_score,
    # image_reward, redness; toy world: toy_clip; python -m vipo_jax.train --list_rewards prints them all
    c.rewards.names = "hpsv21"
    c.rewards.coefs = "1.0"
    c.rewards.hpsv21 = ""  # safetensors made by `python -m vipo_jax.convert hps`
    c.rewards.pickscore = ""  # HF CLIPModel folder (yuvalkirstain/PickScore_v1)
    c.rewards.clip_score = ""  # HF CLIPModel folder (openai/clip-vit-large-patch14)
    c.rewards.image_reward = ""  # folder made by `python -m vipo_jax.convert image-reward` (THUDM/ImageReward)
    c.rewards.image_reward_tokenizer = ""  # bert-base-uncased folder (default: <image_reward>/tokenizer)
    c.rewards.clip_tokenizer = ""  # CLIP tokenizer of the CLIP-family rewards (default: <model.path>/tokenizer)

    c.data = mlc.ConfigDict()
    c.data.prompts = ""  # text (one per line) or JSONL with a "prompt" field
    c.data.eval_prompts = ""
    c.data.cache_dir = ""  # where the prompt-embedding cache and ArrayRecord files go

    c.log = mlc.ConfigDict()
    c.log.every = 1
    c.log.eval_every = 50
    c.log.num_eval_prompts = 8
    c.log.ckpt_every = 20
    c.log.keep_checkpoints = 2
    c.log.tensorboard = True
    c.log.eval_ema = True  # with train.ema_decay > 0: evaluation grids/metrics use the EMA weights
    # time each phase (rollout, decode, rewards, PSM; the update is the rest) once, jitted alone, and
    # report FLOPs and MFU per phase (summary.json, the last metrics record) and per iteration
    c.log.phase_times = True

    # Device mesh (product = all devices of all processes; one axis may be -1 = the rest). Parameters
    # and optimizer state are split over fsdp, samples over data x fsdp (vipo_jax/sharding).
    c.mesh = mlc.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.context = 1
    c.mesh.tensor = 1

    c.sharding = mlc.ConfigDict()
    # Overrides of the logical-axis -> mesh-axes rules, e.g. "embed=,mlp=fsdp,batch=data+fsdp"
    # ("name=" replicates); empty: the defaults of vipo_jax.sharding.DEFAULT_RULES.
    c.sharding.rules = ""
    return c


def _toy(c: mlc.ConfigDict) -> mlc.ConfigDict:
    c.world = "toy"
    c.model.path = ""  # empty: the toy checkpoints shipped in vipo_jax/toy/assets
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.sampling.height = 64
    c.sampling.width = 64
    c.sampling.num_steps = 8
    c.sampling.group_size = 8
    c.sampling.prompts_per_iter = 4
    c.sampling.max_text_len = 10
    c.train.iterations = 100
    # The digit's redness (the subject's pixels only, the mask from the image itself) at lr 2e-5: the
    # reward rises 0.005 -> 0.27 on the evaluation prompts in 100 iterations while the digits stay
    # readable (digit accuracy 0.44 -> 0.38). The global redness at 5e-5 turned every image into a flat
    # red square (digit accuracy 0.75 -> 0.13); docs/EXPERIMENTS.md has both.
    c.optim.lr = 2e-5
    c.rewards.names = "subject_redness"
    c.rewards.coefs = "1.0"
    c.log.eval_every = 25
    c.log.num_eval_prompts = 16
    c.log.ckpt_every = 20
    # the toy DINOv2 reads an 8 x 8 patch grid: sigma 1 blurs each map towards a centre blob (AUC vs the
    # digit 0.966, correlation with the batch-mean map 0.94); 0.5 keeps the strokes (0.987, 0.91)
    c.psm.smooth_sigma = 0.5
    return c


def official(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The official ViPO code's behaviours where they differ from our defaults (docs/METHOD.md,
    "The official code and our defaults"): PCA signs by sklearn >= 1.5's rule, the DiT fed
    int(1000 sigma), DINOv2 read from uint8 levels without resizing, the decoder's output rescaled
    only when negative, a stochastic last step; for FLUX also one ratio per sample (the log-prob's
    mean over the latent)."""
    c.psm.sign_rule = "sklearn_v"
    c.model.timestep_rounding = "floor"
    c.psm.backbone_input = "crop_uint8"
    c.psm.rescale_rule = "if_negative"
    c.sampling.stochastic_last_step = True
    if c.model.family == "flux":
        c.train.logprob_reduction = "sample_mean"
    return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    c = _common()
    arg = (arg or "").strip()
    if arg == "toy":
        return _toy(c)
    if arg == "official":
        return official(c)
    if arg == "toy_official":  # the official behaviours in the toy world (for comparisons at toy scale)
        return official(_toy(c))
    if arg == "schnell":
        c.model.variant = "schnell"
        c.sampling.guidance = 0.0
        c.sampling.max_text_len = 256
        return c
    if arg not in ("", "dev"):
        raise ValueError(f"configs/flux.py: unknown argument {arg!r}; use toy, dev, schnell, official or toy_official")
    return c
