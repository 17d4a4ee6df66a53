"""``build_world(c, source=...)``: the only constructor of a :class:`~vipo_jax.worlds.world.World`.

Weight sources:

* ``toy``: the committed toy checkpoints of the family (``config.world = "toy"``), the toy prompts;
* ``pretrained``: the folders users download (``config.world = "real"``): the family's diffusers
  folder (``model.path``), the PSM backbone and reward checkpoints the config names, the prompt file
  (encoded once into embedding caches next to it, so the big text encoders stay out of memory);
* ``random``: the recipe's shapes with random weights and random prompt embeddings
  (``config.world = "random"``): timing and memory benchmarks without any download;
* ``abstract``: the same shapes with no weights at all (``nnx.eval_shape``): the planner.

Everything the config names is checked before any model loads: the family's settings, the reward
names and coefficients, which rewards the source can load, and the pretrained folders.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from vipo_jax import backbones, rewards
from vipo_jax.backbones import BackboneContext
from vipo_jax.data.prompts import load_prompts
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.rewards import LoadedReward, RewardContext, RewardEntry
from vipo_jax.rewards.frames import per_frame
from vipo_jax.text.prompt_cache import build_cache, cache_path_for, load_cache
from vipo_jax.toy import digits
from vipo_jax.worlds.family import Family, get_family
from vipo_jax.worlds.world import PromptTable, RewardFn, World

log = logging.getLogger(__name__)
_warned_ignored: set[tuple[str, str]] = set()

#: config.world -> weight source
SOURCE_OF_WORLD = {"toy": "toy", "real": "pretrained", "random": "random"}
SOURCES = ("toy", "pretrained", "random", "abstract")


def source_of(c: mlc.ConfigDict) -> str:
    if c.world not in SOURCE_OF_WORLD:
        raise ConfigError(f"--config.world={c.world!r} is not one of {', '.join(SOURCE_OF_WORLD)}")
    return SOURCE_OF_WORLD[c.world]


def check_world_config(c: mlc.ConfigDict, source: str | None = None, *, evaluation: bool = False,
                       files: bool = False) -> None:
    """Everything about the world the config can get wrong, checked without loading a model;
    ``files``: also that every file a pretrained world reads is there."""
    source = source or source_of(c)
    family = get_family(c.model.family)
    family.check_config(c)
    entries = _reward_entries(c, source, evaluation)
    backbone = None
    if c.psm.enabled:
        backbone = backbones.get(str(c.psm.get("backbone_kind", "dinov2")))
        if source not in backbone.sources:
            raise ConfigError(f"--config.psm.backbone_kind={backbone.name!r} cannot be loaded from the {source} "
                              "weights")
    if files and source in ("toy", "pretrained"):  # every file the run needs, before anything loads
        if source == "pretrained":
            _check_pretrained(family, c)
        if backbone is not None and backbone.check is not None:
            backbone.check(BackboneContext(c, source))
        if source == "pretrained" and not c.data.prompts:
            raise DataError("--config.data.prompts is empty: give a prompts file (one prompt per line, or JSONL)")
        for entry in entries.values():
            if entry.check is not None:
                entry.check(RewardContext(c, source))


def warn_ignored_options(c: mlc.ConfigDict, source: str) -> None:
    """Say once (a logged warning) when the config sets an option this world does not read: the
    toy and random worlds bring their own prompts, so a prompt file given to them is not used."""
    if source not in ("toy", "random"):
        return
    for key in ("prompts", "eval_prompts"):
        value = c.data.get(key, "")
        if value and (source, key) not in _warned_ignored:
            _warned_ignored.add((source, key))
            own = "the toy digit captions" if source == "toy" else "random prompt embeddings"
            log.warning("--config.data.%s=%s is ignored by the %s world, which uses %s; drop it, or train a "
                        "real world (--config.world=real) to use it", key, value, source, own)


def build_world(c: mlc.ConfigDict, source: str | None = None, *, sharding: Any = None,
                evaluation: bool = False) -> World:
    """The world of ``c.model.family`` with weights from ``source`` (default: ``c.world``'s).
    ``sharding`` (a ``load_into`` sharding function such as ``vipo_jax.sharding.LogicalSharding``)
    places big checkpoints as they load. ``evaluation``: a world for ``evaluate`` (a pretrained
    world's metrics are every reward model the config gives a path for)."""
    source = source or source_of(c)
    if source not in SOURCES:
        raise ConfigError(f"unknown weight source {source!r}; use one of {', '.join(SOURCES)}")
    check_world_config(c, source, evaluation=evaluation, files=True)
    warn_ignored_options(c, source)
    family = get_family(c.model.family)
    entries = _reward_entries(c, source, evaluation)
    if source == "pretrained":
        root = _check_pretrained(family, c)
        evaluators = None
    elif source == "toy":
        toy = family.toy_models(c)
        evaluators = toy.evaluators
    else:
        evaluators = None
    reward_dtype = "bfloat16" if c.model.dtype == "bfloat16" else "float32"
    ctx = RewardContext(c, source, toy_assets=evaluators, sharding=sharding, dtype=reward_dtype)
    loaded = {name: entry.load(ctx) for name, entry in entries.items()}
    backbone, backbone_entry = None, None
    if c.psm.enabled:
        bctx = BackboneContext(c, source, toy_assets=evaluators, sharding=sharding, dtype=c.model.dtype)
        backbone_entry = backbones.get(str(c.psm.get("backbone_kind", "dinov2")))
        backbone = backbone_entry.load(bctx)

    if source == "toy":
        policy, decoder = toy.policy, toy.decoder
        train, evals, encode = _toy_tables(c, toy.encode, loaded)
    elif source == "pretrained":
        train, evals, encode = _pretrained_tables(family, c, root, loaded)
        policy, decoder = family.pretrained_models(c, root, sharding)
    else:
        policy, decoder = family.shaped_models(c, abstract=source == "abstract")
        train, evals = _shaped_tables(family, c, policy, loaded, abstract=source == "abstract")
        encode = None

    graphdefs: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    graphdefs["policy"], params = nnx.split(policy)
    graphdefs["decoder"], frozen["decoder"] = nnx.split(decoder)
    if backbone is not None and backbone.params is not None:
        frozen["backbone"] = backbone.params
    for name, lr in loaded.items():
        if lr.params is not None:
            frozen.setdefault(lr.params_key or f"reward/{name}", lr.params)
    weights = rewards.reward_weights(c)
    fns = {name: _bind(name, lr, family.video, c) for name, lr in loaded.items()}
    trained = [n for n, _ in weights]
    monitored = [n for n, e in entries.items() if n not in trained and (e.monitor and source == "toy")]
    metric_names = list(entries) if source == "toy" or evaluation else trained
    return World(family=family, source=source, graphdefs=graphdefs, params=params, frozen=frozen,
                 train_prompts=train, eval_prompts=evals, latent_shape=family.latent_shape(c, decoder),
                 rewards={n: fns[n] for n in trained + monitored}, metrics={n: fns[n] for n in metric_names},
                 reward_weights=weights, backbone=None if backbone is None else backbone.features,
                 backbone_reads=backbone_entry.reads if backbone_entry is not None else "images",
                 options=family.options(c, policy, source), encode=encode)


# --- rewards ---------------------------------------------------------------------------------------------
def _reward_entries(c: mlc.ConfigDict, source: str, evaluation: bool = False) -> dict[str, RewardEntry]:
    """The rewards a world of ``source`` loads, by name: the trained ones (in the config's order),
    in the toy source every monitored reward and metric too, and for an evaluation of a pretrained
    world every reward model the config gives a path for (``rewards.evaluation_names``)."""
    names = [n for n, _ in rewards.reward_weights(c)]
    video = get_family(c.model.family).video
    if source == "toy":  # every toy reward and metric; reward models only when the config gives their file
        names += [e.name for e in rewards.available("toy") if e.name not in names and (video or e.reads == "images")
                  and (e.path_key is None or c.rewards.get(e.path_key, ""))]
    elif evaluation:
        names += [n for n in rewards.evaluation_names(c) if n not in names]
    out = {}
    for n in names:
        entry = rewards.get(n)
        if entry.reads == "videos" and not video:
            raise ConfigError(f"reward {n!r} scores videos; model.family={c.model.family!r} makes images")
        if source not in entry.sources:
            where = {"toy": "the toy world", "pretrained": "a pretrained (world=real) run",
                     "random": "a random-weight run", "abstract": "the planner"}[source]
            usable = [e.name for e in rewards.available(source, trainable=True)]
            raise ConfigError(f"reward {n!r} is not available in {where} (available: {', '.join(usable)})")
        out[n] = entry
    return out


def _bind(name: str, lr: LoadedReward, video: bool, c: mlc.ConfigDict) -> RewardFn:
    """A loaded reward as the step's ``fn(frozen, samples, batch)``: its parameters read from
    ``frozen["reward/<name>"]``; on videos its own whole-clip score or the mean over frames."""
    key = lr.params_key or f"reward/{name}"
    score = lr.score
    if video:
        score = lr.video_score or per_frame(lr.score, frame_stride=int(c.rewards.get("frame_stride", 1)),
                                            frames_per_call=int(c.rewards.get("frames_per_call", 0)))
    has_params = lr.params is not None

    def fn(frozen: Mapping[str, Any], samples: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        return score(frozen[key] if has_params else None, samples, batch)

    fn.__name__ = f"reward_{name}"
    return fn


def _reward_inputs(loaded: Mapping[str, LoadedReward], texts: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for lr in loaded.values():
        if lr.prompt_inputs is not None:
            out.update(lr.prompt_inputs(list(texts)))
    return out


def _table(texts: list[str], cond_shared: tuple[dict, dict], loaded: Mapping[str, LoadedReward]) -> PromptTable:
    cond, shared = cond_shared
    return PromptTable(tuple(texts), cond, shared, _reward_inputs(loaded, texts))


# --- prompt tables per source ---------------------------------------------------------------------------
def _toy_tables(c: mlc.ConfigDict, encode_cond: Callable[[list[str]], tuple[dict, dict]],
                loaded: Mapping[str, LoadedReward]) -> tuple[PromptTable, PromptTable, Callable]:
    train = digits.prompt_set("train")
    evals = [digits.caption(*t) for t in digits.eval_combos(int(c.log.num_eval_prompts))]

    def encode(texts: list[str]) -> PromptTable:
        return _table(list(texts), encode_cond(list(texts)), loaded)

    return encode(train), encode(evals), encode


def _check_pretrained(family: Family, c: mlc.ConfigDict) -> Path:
    root = Path(c.model.path) if c.model.path else None
    if root is None or not root.is_dir():
        where = f" at {root}" if root else " (--config.model.path is empty)"
        raise CheckpointError(family.pretrained_help(c, where))
    missing = family.missing_pretrained(c, root)
    if missing:
        raise CheckpointError(family.pretrained_help(c, f" completely in {root}: missing {', '.join(missing)}"))
    return root


def cached_embeddings(sets: dict[str, list[str]], paths: dict[str, Path], new_encoder: Callable[[], Any]) -> dict:
    """Prompt embeddings of several prompt sets (training, evaluation, Wan's negative prompt), each
    from its cache file when that was built for exactly these prompts, else encoded and cached. The
    encoder (T5-XXL / UMT5-XXL: ~10 GB in bf16) is loaded at most once, and only if a cache is stale."""
    out, stale = {}, []
    for k, prompts in sets.items():
        try:
            out[k] = load_cache(paths[k], prompts)
        except DataError:
            stale.append(k)
    if stale:
        encoder = new_encoder()
        for k in stale:
            out[k] = build_cache(sets[k], encoder, paths[k], overwrite=True)
        del encoder
    return out


def _pretrained_tables(family: Family, c: mlc.ConfigDict, root: Path,
                       loaded: Mapping[str, LoadedReward]) -> tuple[PromptTable, PromptTable, Callable]:
    n_eval = int(c.log.num_eval_prompts)
    prompts = load_prompts(c.data.prompts, c.data.cache_dir or None).prompts()
    eval_prompts = (load_prompts(c.data.eval_prompts, c.data.cache_dir or None).prompts()
                    if c.data.eval_prompts else prompts[:n_eval])[:n_eval]
    tag = family.cache_tag(c)
    extra = family.extra_prompts(c)
    sets = {"train": prompts, "eval": eval_prompts, **extra}
    paths = {"train": cache_path_for(c.data.prompts, tag), "eval": cache_path_for(c.data.prompts, tag + "-eval"),
             **{k: cache_path_for(c.data.prompts, f"{tag}-{k}") for k in extra}}
    emb = cached_embeddings(sets, paths, lambda: family.text_encoder(c, root))
    extra_emb = {k: emb[k] for k in extra}

    def encode(texts: list[str]) -> PromptTable:
        """Encodes with a freshly loaded text encoder (evaluation only: training reads the caches)."""
        t5, pooled = family.text_encoder(c, root).encode(list(texts))
        fresh = types.SimpleNamespace(t5=t5, pooled=pooled)
        return _table(list(texts), family.conditioning(fresh, extra_emb), loaded)

    return (_table(prompts, family.conditioning(emb["train"], extra_emb), loaded),
            _table(eval_prompts, family.conditioning(emb["eval"], extra_emb), loaded), encode)


def _shaped_tables(family: Family, c: mlc.ConfigDict, policy: nnx.Module, loaded: Mapping[str, LoadedReward], *,
                   abstract: bool) -> tuple[PromptTable, PromptTable]:
    """Prompt tables of the random / abstract sources: random embeddings (zeros for token ids) of
    the family's conditioning shapes, or their shapes only."""
    cond_specs, shared_specs = family.cond_specs(c, policy)
    input_specs: dict[str, jax.ShapeDtypeStruct] = {}
    for lr in loaded.values():
        input_specs.update(lr.input_specs)
    key = jax.random.PRNGKey(int(c.seed))

    def columns(specs: Mapping[str, jax.ShapeDtypeStruct], n: int, salt: int) -> dict:
        out = {}
        for i, (name, spec) in enumerate(sorted(specs.items())):
            shape, dtype = (n,) + tuple(spec.shape), jnp.dtype(spec.dtype)
            if abstract:
                out[name] = jax.ShapeDtypeStruct(shape, dtype)
            elif jnp.issubdtype(dtype, jnp.floating):
                k = jax.random.fold_in(key, salt * 1000 + i)
                out[name] = np.asarray(jax.random.normal(k, shape, jnp.float32).astype(dtype))
            else:
                out[name] = np.zeros(shape, dtype)
        return out

    def table(n: int, salt: int, what: str) -> PromptTable:
        return PromptTable(tuple(f"{what} prompt {i}" for i in range(n)), columns(cond_specs, n, salt),
                           columns(shared_specs, 1, salt + 1), columns(input_specs, n, salt + 2))

    n_train = int(c.sampling.prompts_per_iter) * 4  # the same table on every host count
    return table(n_train, 1, "random"), table(int(c.log.num_eval_prompts), 5, "random eval")
