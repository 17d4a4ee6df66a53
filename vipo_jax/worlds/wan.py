"""The Wan2.1 family: the Wan DiT as the policy with true classifier-free guidance (the conditional and
the negative-prompt halves as one batch), the Wan VAE as the decoder, UMT5 states as conditioning
(``{"text"}`` per prompt, ``{"neg"}`` shared: WanPipeline's zero-padded encoding). Latents are
(T, H, W, C) per sample, so the step runs the video PSM and video rewards read whole clips (image
rewards are scored per frame).

Weight sources: the committed video toy checkpoints (``vipo_jax/toy/assets/video``: moving digits,
9 frames of 32x32; the image toy world's DINOv2, CLIP and classifier read every frame at 64x64), a
diffusers Wan2.1 T2V folder, or the Wan2.1 shapes (``wan2.1-t2v-1.3b`` / ``-14b`` presets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import ConfigError
from vipo_jax.models.wan import WanConfig, WanTransformer, wan_velocity
from vipo_jax.models.wan import from_pretrained as load_wan_transformer
from vipo_jax.models.wan import preset as wan_preset
from vipo_jax.models.wan.flops import wan_forward_flops
from vipo_jax.models.wan_vae import WanVAE, WanVAEConfig, decode_to_unit
from vipo_jax.models.wan_vae import from_pretrained as load_wan_vae
from vipo_jax.text.prompt_cache import PromptEncoder
from vipo_jax.toy import assets
from vipo_jax.toy.video import FRAME_SIZE, FRAMES, READOUT_SIZE
from vipo_jax.toy.video_assets import load_video, prompt_encoder, video_assets_dir
from vipo_jax.weights.loading import init_model
from vipo_jax.worlds.family import Family, ToyModels, WorldOptions, register_family
from vipo_jax.worlds.flux import arch_overrides

VARIANT_NAMES = {"1.3b": "Wan2.1-T2V-1.3B", "14b": "Wan2.1-T2V-14B"}
HELP = """\
Wan2.1 weights not found{where}.
Download the diffusers folder of Wan-AI/{name}-Diffusers (it has transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), e.g.
    huggingface-cli download Wan-AI/{name}-Diffusers --local-dir /data/{name}-Diffusers
then pass --config.model.path=/data/{name}-Diffusers. Also needed: --config.psm.backbone=<facebook/dinov2-large
folder>, the reward checkpoints (--config.rewards.hpsv21=<converted HPS_v2.1 safetensors>, see
`python -m vipo_jax.convert hps --help`) with --config.rewards.clip_tokenizer=<CLIP tokenizer folder>,
and --config.data.prompts=<prompts.txt>."""


def guidance_scale(c: mlc.ConfigDict) -> float | None:
    """The true-CFG scale, or None (no unconditional pass) for a scale <= 1, as diffusers does."""
    g = float(c.sampling.guidance)
    return g if g > 1.0 else None


class WanFamily(Family):
    name = "wan"
    video = True
    variants = ("1.3b", "14b")
    # self- and cross-attention q, k, v, out; feed-forward in, out
    lora_targets = (r"attn[12]\.to_(q|k|v|out)$", r"ffn\.linear_(in|out)$")
    pretrained_folders = ("transformer", "vae", "text_encoder", "tokenizer")

    def check_config(self, c: mlc.ConfigDict) -> None:
        super().check_config(c)
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
            raise ConfigError("--config.psm.frames_per_call and --config.rewards.frames_per_call must be >= 0 (0: "
                              "all frames of a video in one call)")
        if c.rewards.frame_stride < 1:
            raise ConfigError(f"--config.rewards.frame_stride={c.rewards.frame_stride} must be >= 1")
        if c.world == "toy" and (s.height, s.width, s.num_frames) != (FRAME_SIZE, FRAME_SIZE, FRAMES):
            raise ConfigError(f"the video toy world generates {FRAMES} frames of {FRAME_SIZE}x{FRAME_SIZE}: keep "
                              f"--config.sampling.height/width at {FRAME_SIZE} and num_frames at {FRAMES}")

    def options(self, c: mlc.ConfigDict, policy: nnx.Module, source: str) -> WorldOptions:
        toy = source == "toy"
        return WorldOptions(guidance=guidance_scale(c), uncond_grad=bool(c.sampling.cfg_uncond_grad),
                            frame_readout=READOUT_SIZE if toy else None,
                            frames_per_call=int(c.psm.frames_per_call), png_scale=3 if toy else 1,
                            fps=float(c.sampling.fps),
                            timestep_floor=c.model.get("timestep_rounding", "exact") == "floor")

    def latent_shape(self, c: mlc.ConfigDict, decoder: nnx.Module) -> tuple[int, ...]:
        s, vcfg = c.sampling, decoder.cfg
        f = vcfg.spatial_factor
        return (vcfg.latent_frames(s.num_frames), s.height // f, s.width // f, vcfg.z_dim)

    def velocity(self, policy: nnx.Module, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array],
                 options: WorldOptions) -> jax.Array:
        return wan_velocity(policy, x, sigma, cond["text"], cond["neg"], options.guidance,
                            uncond_grad=options.uncond_grad, timestep_floor=options.timestep_floor)

    def decode(self, decoder: nnx.Module, x0: jax.Array) -> jax.Array:
        return decode_to_unit(decoder, x0)

    def cfg_passes(self, options: WorldOptions) -> int:
        return 2 if options.guidance is not None else 1

    # --- weight sources -------------------------------------------------------------------------------
    def toy_models(self, c: mlc.ConfigDict) -> ToyModels:
        root, m = video_assets_dir(c.model.path or None), c.model
        policy = load_video("transformer", root, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                            attention=m.attention)
        encoder = prompt_encoder(root)
        neg = encoder.encode([c.sampling.negative_prompt])[0]

        def encode(texts: list[str]) -> tuple[dict, dict]:
            return {"text": encoder.encode(texts)[0]}, {"neg": neg}

        return ToyModels(policy, load_video("vae", root), root, assets.assets_dir(), encode)

    def pretrained_models(self, c: mlc.ConfigDict, root: Path, sharding: Any) -> tuple[nnx.Module, nnx.Module]:
        m = c.model
        policy = load_wan_transformer(root / "transformer", param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                                      attention=m.attention, sharding=sharding)
        return policy, load_wan_vae(root / "vae", dtype=m.dtype, sharding=sharding)

    def shaped_models(self, c: mlc.ConfigDict, abstract: bool) -> tuple[nnx.Module, nnx.Module]:
        m = c.model
        cfg = wan_preset(f"wan2.1-t2v-{m.variant}", param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                         attention=m.attention)
        over = arch_overrides(c)
        if over:
            cfg = cfg.replace(**over)
        policy = init_model(WanTransformer, cfg, abstract=abstract)
        decoder = init_model(WanVAE, WanVAEConfig.wan21(dtype=m.dtype), abstract=abstract, seed=1)
        return policy, decoder

    def pretrained_help(self, c: mlc.ConfigDict, where: str) -> str:
        return HELP.format(where=where, name=VARIANT_NAMES.get(str(c.model.variant), str(c.model.variant)))

    def cache_tag(self, c: mlc.ConfigDict) -> str:
        return f"wan-{c.model.variant}-{c.sampling.max_text_len}-{c.model.dtype}"

    def text_encoder(self, c: mlc.ConfigDict, root: Path) -> PromptEncoder:
        return PromptEncoder.from_wan(root, dtype=c.model.dtype, param_dtype=c.model.dtype,
                                      max_sequence_length=c.sampling.max_text_len)

    def extra_prompts(self, c: mlc.ConfigDict) -> dict[str, list[str]]:
        return {"negative": [c.sampling.negative_prompt]}

    def conditioning(self, embeds: Any, extra: Mapping[str, Any]) -> tuple[dict, dict]:
        return {"text": embeds.t5}, {"neg": extra["negative"].t5}

    def cond_specs(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[dict, dict]:
        row = jax.ShapeDtypeStruct((c.sampling.max_text_len, policy.cfg.text_dim), jnp.dtype(c.model.dtype))
        return {"text": row}, {"neg": row}

    # --- planner --------------------------------------------------------------------------------------
    def _tokens(self, c: mlc.ConfigDict, cfg: WanConfig) -> tuple[int, int, int, int, int]:
        s = c.sampling
        t_lat, h, w = (int(s.num_frames) - 1) // 4 + 1, s.height // 8, s.width // 8
        pt, ph, pw = cfg.patch_size
        return t_lat, h, w, (t_lat // pt) * (h // ph) * (w // pw), int(s.max_text_len)

    def forward_flops(self, c: mlc.ConfigDict, policy: nnx.Module) -> float:
        *_, n_video, n_txt = self._tokens(c, policy.cfg)
        return wan_forward_flops(policy.cfg, n_video, n_txt)

    def flops_probe(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[float, Callable, tuple]:
        small = policy.cfg.replace(num_layers=1, remat="none")
        t_lat, h, w, n_video, n_txt = self._tokens(c, small)
        gd, state = nnx.split(init_model(WanTransformer, small, abstract=True))

        def one_block(st, x, text):
            return wan_velocity(nnx.merge(gd, st), x, jnp.full((1,), 0.5), text)

        args = (state, jax.ShapeDtypeStruct((1, t_lat, h, w, small.in_channels), jnp.float32),
                jax.ShapeDtypeStruct((1, n_txt, small.text_dim), jnp.dtype(c.model.dtype)))
        return wan_forward_flops(small, n_video, n_txt), one_block, args

    def describe(self, c: mlc.ConfigDict) -> str:
        s = c.sampling
        return f"Wan2.1-T2V-{str(c.model.variant).upper()} {s.num_frames}x{s.height}x{s.width}"


WAN = register_family(WanFamily())
