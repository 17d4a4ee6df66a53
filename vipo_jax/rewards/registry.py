"""The reward registry: every reward (and evaluation metric) the train step, ``evaluate`` and the
planner can use, by name.

A reward is one file that registers one :class:`RewardEntry`: its name, how to load it for a
world (``load(ctx) -> LoadedReward``: frozen parameters, a pure score function, the per-prompt
inputs it needs), what it reads (``"images"``: one decoded image per sample, which a video world
scores on every frame and averages; ``"videos"``: whole clips), which weight sources it works with,
and whether it can be trained on or only measured. The world (``vipo_jax.worlds``) turns entries
into the step's reward functions; nothing else in the code spells a reward's name.

Score functions are ``score(params, samples, batch) -> (N,) float32``: ``params`` the reward's own
frozen parameters (``None`` for model-free rewards), ``samples`` decoded images ``(N, H, W, 3)`` (or
videos ``(N, T, H, W, 3)`` for ``reads="videos"``) in [0, 1], ``batch`` the per-sample rows of the
inputs its ``prompt_inputs`` made for each prompt.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from vipo_jax.errors import ConfigError

Array = jax.Array
ScoreFn = Callable[[Any, Array, Mapping[str, Array]], Array]
#: Weight sources a world can be built from (``vipo_jax.worlds``).
SOURCES = ("toy", "pretrained", "random", "abstract")
READS = ("images", "videos")


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward's loader may look at: the run config, the weight source, where toy assets live,
    how to place big checkpoints as they load, and the dtype reward models compute in."""

    config: mlc.ConfigDict
    source: str
    toy_assets: Path | None = None
    sharding: Any = None
    dtype: str = "float32"
    #: models loaded by earlier entries of the same world (several rewards read one model)
    cache: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def abstract(self) -> bool:
        """Build shapes only (``nnx.eval_shape``), no weights: the planner's source."""
        return self.source == "abstract"


@dataclasses.dataclass(frozen=True)
class LoadedReward:
    """A reward ready for a world: pure ``score``, its frozen ``params`` (any pytree, abstract for the
    planner), the per-prompt inputs it reads (``prompt_inputs(texts) -> {name: (N, ...) array}`` and
    their row shapes ``input_specs``), optionally ``video_score``, its own whole-clip version
    (otherwise a video world averages ``score`` over frames), and ``params_key``."""

    score: ScoreFn
    params: Any = None
    prompt_inputs: Callable[[list[str]], dict[str, np.ndarray]] | None = None
    input_specs: Mapping[str, jax.ShapeDtypeStruct] = dataclasses.field(default_factory=dict)
    video_score: ScoreFn | None = None
    #: where the world keeps ``params`` in its frozen tree (default ``reward/<name>``); rewards that
    #: read one model (VideoAlign's VQ / MQ / TA heads) give the same key and share one copy
    params_key: str | None = None


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """One registered reward. ``path_key``: the ``config.rewards`` field holding its checkpoint
    (evaluation scores every reward whose path is given). ``trainable=False``: a metric only
    (``--config.rewards.names`` refuses it). ``monitor``: cheap enough to score in every training
    iteration too, next to the trained rewards."""

    name: str
    load: Callable[[RewardContext], LoadedReward]
    help: str
    reads: str = "images"
    sources: tuple[str, ...] = SOURCES
    trainable: bool = True
    monitor: bool = False
    path_key: str | None = None
    #: ``check(ctx)``: raise CheckpointError for a missing file before any model loads (pretrained)
    check: Callable[[RewardContext], None] | None = None

    def __post_init__(self) -> None:
        if self.reads not in READS:
            raise ValueError(f"reward {self.name!r}: reads must be one of {READS}, got {self.reads!r}")
        unknown = set(self.sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"reward {self.name!r}: unknown sources {sorted(unknown)}; known {SOURCES}")


REWARDS: dict[str, RewardEntry] = {}


def register(entry: RewardEntry) -> RewardEntry:
    """Add ``entry`` (a reward module calls this once at import). Re-registering a name replaces it."""
    REWARDS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a reward (tests that register throwaway rewards)."""
    REWARDS.pop(name, None)


def get(name: str) -> RewardEntry:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def available(source: str, *, trainable: bool | None = None) -> list[RewardEntry]:
    """Registered rewards that load from ``source`` (in registration order)."""
    return [e for e in REWARDS.values()
            if source in e.sources and (trainable is None or e.trainable == trainable)]


def reward_weights(c: mlc.ConfigDict) -> tuple[tuple[str, float], ...]:
    """``config.rewards.names`` / ``coefs`` as ``((name, coefficient), ...)``, every name a
    registered, trainable reward and every coefficient a finite number > 0."""
    names = [n.strip() for n in str(c.rewards.names).split(",") if n.strip()]
    coefs = [s.strip() for s in str(c.rewards.coefs).split(",") if s.strip()]
    if not names:
        raise ConfigError("--config.rewards.names is empty: name at least one reward")
    if len(set(names)) != len(names):
        raise ConfigError(f"--config.rewards.names={c.rewards.names!r} names a reward twice")
    for n in names:
        if n not in REWARDS:
            raise ConfigError(f"--config.rewards.names: unknown reward {n!r}; known: "
                              f"{', '.join(e.name for e in REWARDS.values() if e.trainable)}")
        if not REWARDS[n].trainable:
            raise ConfigError(f"--config.rewards.names: {n!r} is an evaluation metric, not a reward to train on")
    if len(coefs) != len(names):
        raise ConfigError(f"--config.rewards.coefs has {len(coefs)} values for {len(names)} rewards ({names})")
    try:
        vals = [float(x) for x in coefs]
    except ValueError as e:
        raise ConfigError(f"--config.rewards.coefs must be numbers: {c.rewards.coefs!r}") from e
    for n, v in zip(names, vals):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"--config.rewards.coefs: the coefficient of {n!r} is {v}; it must be a finite "
                              "number > 0")
    return tuple(zip(names, vals))


def evaluation_names(c: mlc.ConfigDict) -> list[str]:
    """The rewards an evaluation of a pretrained world scores: the trained ones and every reward
    model whose checkpoint the config gives (``path_key``)."""
    trained = [n for n, _ in reward_weights(c)]
    extra = [e.name for e in REWARDS.values()
             if e.path_key and e.name not in trained and e.path_key in c.rewards and c.rewards[e.path_key]]
    return trained + extra
