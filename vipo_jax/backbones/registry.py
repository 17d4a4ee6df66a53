"""The PSM backbone registry: frozen vision models whose patch features the Perceptual Structuring
Module turns into an advantage map (``vipo_jax.rl.psm``), by name (``--config.psm.backbone_kind``).

A backbone is one file that registers one :class:`BackboneEntry`; its loader returns a
:class:`LoadedBackbone`: a pure ``features(params, images) -> (N, h, w, D)`` over decoded images
``(N, H, W, 3)`` in [0, 1] (the backbone does its own resizing and normalisation) and its frozen
parameters. Video worlds call it on every frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc

from vipo_jax.errors import ConfigError

Array = jax.Array
SOURCES = ("toy", "pretrained", "random", "abstract")


@dataclasses.dataclass(frozen=True)
class BackboneContext:
    """What a backbone's loader may look at (see ``vipo_jax.rewards.registry.RewardContext``)."""

    config: mlc.ConfigDict
    source: str
    toy_assets: Path | None = None
    sharding: Any = None
    dtype: str = "float32"

    @property
    def abstract(self) -> bool:
        return self.source == "abstract"


@dataclasses.dataclass(frozen=True)
class LoadedBackbone:
    features: Callable[[Any, Array], Array]
    params: Any = None


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    """``reads``: ``"images"`` (the decoded samples, per frame for video) or ``"latents"`` (the final
    clean latents: (B, H, W, C), or (B, T, H, W, C) latent frames for video)."""

    name: str
    load: Callable[[BackboneContext], LoadedBackbone]
    help: str
    sources: tuple[str, ...] = SOURCES
    reads: str = "images"
    #: ``check(ctx)``: raise CheckpointError for a missing file before any model loads (pretrained)
    check: Callable[[BackboneContext], None] | None = None


BACKBONES: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    BACKBONES[entry.name] = entry
    return entry


def get(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise ConfigError(f"--config.psm.backbone_kind={name!r} is not a PSM backbone; known: "
                          f"{', '.join(BACKBONES)}")
    return BACKBONES[name]
