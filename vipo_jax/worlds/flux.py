"""The FLUX.1 family: the Flux DiT as the policy (embedded guidance for dev), the FLUX AutoencoderKL as
the decoder, T5-XXL states + the CLIP-L pooled vector as conditioning (``{"t5", "pooled"}``).

Weight sources: the committed toy checkpoints (``vipo_jax/toy/assets``: 64x64 coloured digits), a
diffusers FLUX.1 folder (``--config.model.path``; ``--config.model.transformer`` may name another
transformer: a diffusers ``transformer/`` folder or the BFL single file ``flux1-dev.safetensors``),
or the FLUX.1 shapes (``flux-dev`` / ``flux-schnell`` presets, with ``model.arch`` overrides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import ConfigError
from vipo_jax.models.flux import FluxConfig, FluxTransformer, flux_velocity, preset
from vipo_jax.models.flux import from_pretrained as load_flux_transformer
from vipo_jax.models.flux.flops import flux_forward_flops
from vipo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, decode_to_unit
from vipo_jax.models.vae import from_pretrained as load_vae
from vipo_jax.text.prompt_cache import PromptEncoder
from vipo_jax.toy import assets
from vipo_jax.weights.loading import init_model
from vipo_jax.worlds.family import Family, ToyModels, WorldOptions, register_family

HELP = """\
FLUX.1 weights not found{where}.
Download the diffusers folder of black-forest-labs/FLUX.1-{variant} (it has transformer/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/), e.g.
    huggingface-cli download black-forest-labs/FLUX.1-{variant} --local-dir /data/FLUX.1-{variant}
then pass --config.model.path=/data/FLUX.1-{variant} (and --config.model.transformer=<flux1-{variant}.safetensors>
to train the BFL single file instead of transformer/). Also needed: --config.psm.backbone=<facebook/dinov2-large
folder>, the reward checkpoints (--config.rewards.hpsv21=<converted HPS_v2.1 safetensors>, see
`python -m vipo_jax.convert hps --help`) and --config.data.prompts=<prompts.txt>."""


def arch_overrides(c: mlc.ConfigDict) -> dict[str, Any]:
    """``--config.model.arch="num_layers=2,num_single_layers=4"``: architecture fields replaced in the
    preset of the random / abstract sources (e.g. a shallower model at the real width)."""
    text = str(c.model.get("arch", "") or "")
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--config.model.arch={text!r}: expected name=value pairs like 'num_layers=2'")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


class FluxFamily(Family):
    name = "flux"
    variants = ("dev", "schnell")
    # double blocks: img/txt attention qkv and output, img/txt MLP; single blocks: fused qkv+MLP in, out
    lora_targets = (r"_attn\.qkv$", r"_attn_out$", r"_mlp\.linear_(in|out)$", r"single_transformer_blocks\.linear[12]$")
    pretrained_folders = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def check_config(self, c: mlc.ConfigDict) -> None:
        super().check_config(c)
        if c.world == "toy" and (c.sampling.height, c.sampling.width) != (64, 64):
            raise ConfigError("the toy world generates 64x64 images: keep --config.sampling.height/width at 64")

    def options(self, c: mlc.ConfigDict, policy: nnx.Module, source: str) -> WorldOptions:
        guidance = float(c.sampling.guidance) if policy.cfg.guidance_embeds else None
        return WorldOptions(guidance=guidance, png_scale=2 if source == "toy" else 1,
                            timestep_floor=c.model.get("timestep_rounding", "exact") == "floor")

    def latent_shape(self, c: mlc.ConfigDict, decoder: nnx.Module) -> tuple[int, ...]:
        f = decoder.cfg.downsample_factor
        return (c.sampling.height // f, c.sampling.width // f, decoder.cfg.latent_channels)

    def velocity(self, policy: nnx.Module, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array],
                 options: WorldOptions) -> jax.Array:
        g = None if options.guidance is None else jnp.full((x.shape[0],), options.guidance, jnp.float32)
        return flux_velocity(policy, x, sigma, cond["t5"], cond["pooled"], g, timestep_floor=options.timestep_floor)

    def decode(self, decoder: nnx.Module, x0: jax.Array) -> jax.Array:
        return decode_to_unit(decoder, x0)

    # --- weight sources -------------------------------------------------------------------------------
    def toy_models(self, c: mlc.ConfigDict) -> ToyModels:
        root = assets.assets_dir(c.model.path or None)
        m = c.model
        policy = assets.load("transformer", root, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                             attention=m.attention)
        t5, clip = assets.load("text_encoder_2", root), assets.load("clip", root)

        def encode(texts: list[str]) -> tuple[dict, dict]:
            return assets.encode_conditioning(texts, root, t5=t5, clip=clip), {}

        return ToyModels(policy, assets.load("vae", root), root, root, encode)

    def missing_pretrained(self, c: mlc.ConfigDict, root: Path) -> list[str]:
        path = self.transformer_path(c, root)
        return ([] if path.exists() else [str(path) if c.model.transformer else "transformer"]) \
            + super().missing_pretrained(c, root)

    def transformer_path(self, c: mlc.ConfigDict, root: Path) -> Path:
        given = str(c.model.get("transformer", "") or "")
        return Path(given) if given else root / "transformer"

    def pretrained_models(self, c: mlc.ConfigDict, root: Path, sharding: Any) -> tuple[nnx.Module, nnx.Module]:
        m = c.model
        path = self.transformer_path(c, root)
        config = None
        if path.is_file():  # a single file (BFL layout) has no config: the folder's, else the variant's
            folder_cfg = root / "transformer" / "config.json"
            config = FluxConfig.from_pretrained(folder_cfg.parent) if folder_cfg.is_file() else f"flux-{m.variant}"
        policy = load_flux_transformer(path, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                                       attention=m.attention, sharding=sharding, config=config)
        return policy, load_vae(root / "vae", dtype=m.dtype, sharding=sharding)

    def shaped_models(self, c: mlc.ConfigDict, abstract: bool) -> tuple[nnx.Module, nnx.Module]:
        m = c.model
        cfg = preset(f"flux-{m.variant}", param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                     attention=m.attention)
        over = arch_overrides(c)
        if over:
            unknown = sorted(set(over) - {f.name for f in dataclasses.fields(FluxConfig)})
            if unknown:
                raise ConfigError(f"--config.model.arch: {', '.join(unknown)} not FluxConfig field(s)")
            cfg = cfg.replace(**over)
        policy = init_model(FluxTransformer, cfg, abstract=abstract)
        decoder = init_model(AutoencoderKL, AutoencoderKLConfig.flux1(dtype=m.dtype), abstract=abstract, seed=1)
        return policy, decoder

    def pretrained_help(self, c: mlc.ConfigDict, where: str) -> str:
        return HELP.format(where=where, variant=c.model.variant)

    def cache_tag(self, c: mlc.ConfigDict) -> str:
        return f"flux-{c.model.variant}-{c.sampling.max_text_len}-{c.model.dtype}"

    def text_encoder(self, c: mlc.ConfigDict, root: Path) -> PromptEncoder:
        return PromptEncoder.from_flux(root, c.model.variant, dtype=c.model.dtype, param_dtype=c.model.dtype,
                                       max_sequence_length=c.sampling.max_text_len)

    def conditioning(self, embeds: Any, extra: Mapping[str, Any]) -> tuple[dict, dict]:
        return {"t5": embeds.t5, "pooled": embeds.pooled}, {}

    def cond_specs(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[dict, dict]:
        cfg = policy.cfg
        t5 = jax.ShapeDtypeStruct((c.sampling.max_text_len, cfg.joint_attention_dim), jnp.dtype(c.model.dtype))
        return {"t5": t5, "pooled": jax.ShapeDtypeStruct((cfg.pooled_projection_dim,), jnp.float32)}, {}

    # --- planner --------------------------------------------------------------------------------------
    def _tokens(self, c: mlc.ConfigDict) -> tuple[int, int, int, int]:
        h, w = c.sampling.height // 8, c.sampling.width // 8
        return h, w, (h // 2) * (w // 2), int(c.sampling.max_text_len)

    def forward_flops(self, c: mlc.ConfigDict, policy: nnx.Module) -> float:
        _, _, n_img, n_txt = self._tokens(c)
        return flux_forward_flops(policy.cfg, n_img, n_txt)

    def flops_probe(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[float, Callable, tuple]:
        h, w, n_img, n_txt = self._tokens(c)
        small = policy.cfg.replace(num_layers=1, num_single_layers=1, remat="none")
        gd, state = nnx.split(init_model(FluxTransformer, small, abstract=True))
        guidance = small.guidance_embeds

        def one_pair(st, x, t5, pooled):
            g = jnp.full((1,), 3.5, jnp.float32) if guidance else None
            return flux_velocity(nnx.merge(gd, st), x, jnp.full((1,), 0.5), t5, pooled, g)

        args = (state, jax.ShapeDtypeStruct((1, h, w, small.in_channels // 4), jnp.float32),  # 2x2 packed tokens
                jax.ShapeDtypeStruct((1, n_txt, small.joint_attention_dim), jnp.dtype(c.model.dtype)),
                jax.ShapeDtypeStruct((1, small.pooled_projection_dim), jnp.float32))
        return flux_forward_flops(small, n_img, n_txt), one_pair, args

    def describe(self, c: mlc.ConfigDict) -> str:
        return f"FLUX.1-{c.model.variant} {c.sampling.height}x{c.sampling.width}"


FLUX = register_family(FluxFamily())
