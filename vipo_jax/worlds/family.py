"""Model families: what differs between FLUX.1 and Wan2.1 (and any family added later), independent
of where the weights come from.

A family knows its policy and decoder classes and how to load them from each weight source (toy
assets, a pretrained folder, or shapes only / random weights at the recipe's size), how it turns
cached prompt embeddings into conditioning, how its policy gives a velocity and its decoder an image
or a video, its latent shape, its LoRA target layers, the checks of its config, and its FLOPs for
the planner. Register a new one with :func:`register_family`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import ConfigError
from vipo_jax.nn.attention import available_attention
from vipo_jax.nn.stack import REMAT_POLICIES
from vipo_jax.text.prompt_cache import PromptEncoder

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class WorldOptions:
    """Family settings the step's callables read: ``guidance`` (Flux: the embedded guidance value;
    Wan: the true-CFG scale; ``None``: off), ``uncond_grad`` (Wan: gradient through the
    unconditional half), ``frame_readout`` (video: frames resized to this square size for the PSM
    backbone; ``None``: as decoded), ``frames_per_call`` (video: backbone frames per call, 0: all),
    ``png_scale`` / ``fps`` (the evaluation grids), ``timestep_floor`` (the DiT sees ``int(1000
    sigma)`` as the official scripts feed it: ``model.timestep_rounding=floor``)."""

    guidance: float | None = None
    uncond_grad: bool = False
    frame_readout: int | None = None
    frames_per_call: int = 0
    png_scale: int = 1
    fps: float = 8.0
    timestep_floor: bool = False


class ToyModels:
    """What a family's toy assets give: the policy, the decoder, the assets folder they came from
    (``root``), the folder of the image toy world's frozen evaluators (DINOv2, CLIP, classifier), and
    ``encode(texts) -> (cond, shared)``."""

    def __init__(self, policy: nnx.Module, decoder: nnx.Module, root: Path, evaluators: Path,
                 encode: Callable[[list[str]], tuple[dict, dict]]):
        self.policy, self.decoder, self.root = policy, decoder, root
        self.evaluators, self.encode = evaluators, encode


class Family(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    video: bool = False
    variants: tuple[str, ...] = ()
    #: regular expressions of the layers LoRA adapts when ``lora.targets`` is empty
    lora_targets: tuple[str, ...] = ()
    #: folders a pretrained (diffusers) folder must hold
    pretrained_folders: tuple[str, ...] = ()

    # --- configuration ---------------------------------------------------------------------------------
    def check_config(self, c: mlc.ConfigDict) -> None:
        """Config checks of the model section and the resolution (ConfigError naming the field); run
        before anything loads. Subclasses add their own after calling this."""
        m, s = c.model, c.sampling
        for key in ("param_dtype", "dtype"):
            if m[key] not in DTYPES:
                raise ConfigError(f"--config.model.{key}={m[key]!r} is not one of {', '.join(DTYPES)}")
        if m.remat not in REMAT_POLICIES:
            raise ConfigError(f"--config.model.remat={m.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if m.get("timestep_rounding", "exact") not in ("exact", "floor"):
            raise ConfigError(f"--config.model.timestep_rounding={m.timestep_rounding!r} is not one of exact, floor")
        if m.attention not in available_attention():
            raise ConfigError(f"--config.model.attention={m.attention!r} is not one of "
                              f"{', '.join(available_attention())}")
        if s.height <= 0 or s.width <= 0 or s.height % 16 or s.width % 16:
            raise ConfigError(f"resolution {s.height}x{s.width}: --config.sampling.height and width must be positive "
                              "multiples of 16 (VAE downsampling x 2x2 latent patches)")
        if not 1 <= s.max_text_len <= 512:
            raise ConfigError(f"--config.sampling.max_text_len={s.max_text_len}: the T5 prompt length must be in "
                              "1..512 (FLUX.1: 512 for dev, 256 for schnell; Wan2.1: 512)")
        if c.model.variant not in self.variants:
            raise ConfigError(f"--config.model.variant={c.model.variant!r} is not a {self.name} variant: use one "
                              f"of {', '.join(self.variants)}")

    @abc.abstractmethod
    def options(self, c: mlc.ConfigDict, policy: nnx.Module, source: str) -> WorldOptions:
        """The step options of this family for a loaded policy."""

    @abc.abstractmethod
    def latent_shape(self, c: mlc.ConfigDict, decoder: nnx.Module) -> tuple[int, ...]:
        """One sample's latent: (H, W, C) for images, (T, H, W, C) for videos."""

    # --- the step's callables --------------------------------------------------------------------------
    @abc.abstractmethod
    def velocity(self, policy: nnx.Module, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array],
                 options: WorldOptions) -> jax.Array:
        """v(x, sigma) of the policy for latents ``x`` (B, *latent) and conditioning rows ``cond``."""

    @abc.abstractmethod
    def decode(self, decoder: nnx.Module, x0: jax.Array) -> jax.Array:
        """Clean latents -> samples in [0, 1]."""

    # --- weight sources ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def toy_models(self, c: mlc.ConfigDict) -> ToyModels:
        """The committed toy checkpoints of this family."""

    @abc.abstractmethod
    def pretrained_models(self, c: mlc.ConfigDict, root: Path, sharding: Any) -> tuple[nnx.Module, nnx.Module]:
        """(policy, decoder) from a pretrained folder."""

    @abc.abstractmethod
    def shaped_models(self, c: mlc.ConfigDict, abstract: bool) -> tuple[nnx.Module, nnx.Module]:
        """(policy, decoder) at the recipe's size: shapes only (``abstract``) or random weights."""

    def missing_pretrained(self, c: mlc.ConfigDict, root: Path) -> list[str]:
        """What a pretrained folder lacks (names of missing parts; empty when complete)."""
        return [d for d in self.pretrained_folders if not (root / d).is_dir()]

    @abc.abstractmethod
    def pretrained_help(self, c: mlc.ConfigDict, where: str) -> str:
        """What to download when the pretrained folder is missing or incomplete."""

    @abc.abstractmethod
    def cache_tag(self, c: mlc.ConfigDict) -> str:
        """Names the prompt-embedding caches of this family's text encoder settings."""

    @abc.abstractmethod
    def text_encoder(self, c: mlc.ConfigDict, root: Path) -> PromptEncoder:
        """The pretrained folder's text encoder(s) (loaded only when a cache is stale)."""

    def extra_prompts(self, c: mlc.ConfigDict) -> dict[str, list[str]]:
        """Prompt sets every batch shares (e.g. Wan's negative prompt), embedded and cached like the
        training prompts."""
        return {}

    @abc.abstractmethod
    def conditioning(self, embeds: Any, extra: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(cond, shared)`` rows from the prompts' embeddings (``PromptEmbeddings``) and the
        extra sets' embeddings (see :meth:`extra_prompts`)."""

    @abc.abstractmethod
    def cond_specs(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[dict, dict]:
        """Row shapes (``jax.ShapeDtypeStruct``) of ``(cond, shared)`` for the abstract and random sources."""

    # --- planner ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_flops(self, c: mlc.ConfigDict, policy: nnx.Module) -> float:
        """Analytic FLOPs of one policy forward for one sample (one CFG half)."""

    def cfg_passes(self, options: WorldOptions) -> int:
        """Policy passes per forward (2 with true classifier-free guidance)."""
        return 1

    @abc.abstractmethod
    def flops_probe(self, c: mlc.ConfigDict, policy: nnx.Module) -> tuple[float, Callable, tuple]:
        """(analytic FLOPs, fn, abstract args) of a one-block-per-kind model at the real width and
        sequence, for checking the formula against XLA's count."""

    @abc.abstractmethod
    def describe(self, c: mlc.ConfigDict) -> str:
        """A short label (model and resolution) for tables."""


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"--config.model.family={name!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
