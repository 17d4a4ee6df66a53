"""The World: everything model-specific the train step, the loop, evaluation and the planner need,
as one frozen value built by :func:`vipo_jax.worlds.build_world` from a model family (flux, wan)
and a weight source (toy, pretrained, random, abstract).

It holds the policy (graph + initial parameters), the frozen models' parameters (decoder, PSM
backbone, reward models; under LoRA also the policy's base weights), the training and evaluation
prompt tables, and the pure callables of the step: ``velocity_fn(params, x, sigma, cond)``,
``decode_fn(frozen, x0)``, ``feature_fn(frozen, samples)`` and ``reward_fns[name](frozen, samples,
batch)``. Nothing mutates a World: placing its frozen models on a mesh or attaching LoRA adapters
returns a new one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.data.prompts import PromptLoader
from vipo_jax.errors import ConfigError
from vipo_jax.nn.lora import LoraConfig, add_lora
from vipo_jax.rewards.frames import map_frames, resize_frames
from vipo_jax.rl.psm import PSMOptions, psm_map, psm_map_video
from vipo_jax.worlds.family import Family, WorldOptions
from vipo_jax.worlds.metrics import eval_means

#: Seed of the fixed initial noise of the evaluation samples drawn during training.
EVAL_SEED = 1234
#: Where the frozen base weights of a LoRA policy live in ``World.frozen``.
BASE_KEY = "policy_base"
RewardFn = Callable[[Any, jax.Array, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTable:
    """Prompts and what the step reads for each: ``cond`` (per-prompt conditioning rows, e.g. T5
    states), ``shared`` (conditioning rows every prompt shares, e.g. the negative prompt: one row),
    ``inputs`` (per-prompt reward / metric inputs: token ids, labels). Columns are numpy arrays, or
    ``jax.ShapeDtypeStruct`` for the abstract source."""

    prompts: tuple[str, ...]
    cond: Mapping[str, Any]
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, indices: Any) -> dict:
        """Rows ``indices`` as the step's batch: ``{"cond": {...}, **inputs}`` (shared rows repeated)."""
        indices = np.asarray(indices)
        take = {k: jnp.asarray(np.asarray(v)[indices]) for k, v in self.cond.items()}
        for k, v in self.shared.items():
            v = np.asarray(v)
            take[k] = jnp.asarray(np.broadcast_to(v[:1], (len(indices),) + v.shape[1:]))
        return {"cond": take, **{k: jnp.asarray(np.asarray(v)[indices]) for k, v in self.inputs.items()}}

    def shapes(self, n: int) -> dict:
        """The ``jax.ShapeDtypeStruct`` tree of a batch of ``n`` rows (the planner's input)."""
        def spec(v: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((n,) + tuple(np.shape(v))[1:], v.dtype)

        cond = {k: spec(v) for k, v in {**self.cond, **self.shared}.items()}
        return {"cond": cond, **{k: spec(v) for k, v in self.inputs.items()}}


class _Loader:
    """A PromptLoader over this process's share of the prompts; ``next()`` gives global indices."""

    def __init__(self, num_records: int, batch_size: int, seed: int):
        self._loader = PromptLoader(num_records=num_records, batch_size=batch_size, seed=seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    def next(self) -> np.ndarray:
        return np.asarray(next(self._loader)["index"])

    def state(self) -> dict:
        return self._loader.state()

    def restore(self, state: dict) -> None:
        self._loader.restore(state)


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    family: Family
    source: str
    graphdefs: Mapping[str, Any]
    params: Any  # the policy's (initial) parameters, an nnx.State
    frozen: Mapping[str, Any]
    train_prompts: PromptTable
    eval_prompts: PromptTable
    latent_shape: tuple[int, ...]
    rewards: Mapping[str, RewardFn]  # scored every iteration: the trained rewards first, then monitors
    metrics: Mapping[str, RewardFn]  # scored by the evaluations
    reward_weights: tuple[tuple[str, float], ...]
    backbone: Callable[[Any, jax.Array], jax.Array] | None
    options: WorldOptions
    backbone_reads: str = "images"  # or "latents": the PSM backbone reads the clean latents
    encode: Callable[[list[str]], PromptTable] | None = None
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    # --- what the step composes -----------------------------------------------------------------
    @property
    def main_reward(self) -> str:
        return self.reward_weights[0][0]

    @property
    def video(self) -> bool:
        return self.family.video

    def velocity_fn(self, params: Any, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        """The policy's velocity at latents ``x`` (B, *latent) and noise levels ``sigma`` (B,)."""
        return self.family.velocity(nnx.merge(self.graphdefs["policy"], params), x, sigma, cond, self.options)

    def decode_fn(self, frozen: Mapping[str, Any], x0: jax.Array) -> jax.Array:
        """Clean latents -> images (B, H, W, 3) or videos (B, T, H, W, 3) in [0, 1]."""
        return self.family.decode(nnx.merge(self.graphdefs["decoder"], frozen["decoder"]), x0)

    def feature_fn(self, frozen: Mapping[str, Any], samples: jax.Array, latents: jax.Array | None = None
                   ) -> jax.Array:
        """The PSM backbone's patch features: (B, h, w, D) of images, (B, T, h, w, D) of videos (per
        frame); a backbone that reads latents gets ``latents`` (the final clean latents) instead."""
        if self.backbone is None:
            raise ValueError("this world has no PSM backbone (psm.enabled=False)")
        params = frozen.get("backbone")
        if self.backbone_reads == "latents":
            if latents is None:
                raise ValueError("the PSM backbone reads the clean latents: pass latents=")
            return self.backbone(params, latents)
        if not self.video:
            return self.backbone(params, samples)
        size = self.options.frame_readout
        return map_frames(lambda fr: self.backbone(params, resize_frames(fr, size)), samples,
                          self.options.frames_per_call)

    @property
    def has_backbone(self) -> bool:
        return self.backbone is not None

    def psm_maps(self, frozen: Mapping[str, Any], samples: jax.Array, latents: jax.Array | None,
                 options: PSMOptions) -> jax.Array:
        """The PSM's advantage maps of ``samples`` on the latent grid: (B, H, W) for images, (B, T,
        H, W) for videos (``latents``: the samples' clean latents, for a backbone that reads them)."""
        feats = self.feature_fn(frozen, samples, latents)
        if self.video:
            return psm_map_video(feats, tuple(self.latent_shape[:3]), options)
        return psm_map(feats, tuple(self.latent_shape[:2]), options)

    # --- data ------------------------------------------------------------------------------------
    def prompt_loader(self, batch_size: int, seed: int) -> _Loader:
        return _Loader(len(self.train_prompts), batch_size, seed)

    def batch(self, indices: Any) -> dict:
        return self.train_prompts.rows(indices)

    def eval_inputs(self) -> tuple[dict, jax.Array, list[str]]:
        """The evaluation prompts' conditioning, their fixed initial noises and the prompts."""
        n = len(self.eval_prompts)
        noise = jax.random.normal(jax.random.PRNGKey(EVAL_SEED), (n,) + tuple(self.latent_shape))
        return self.eval_prompts.rows(np.arange(n))["cond"], noise, list(self.eval_prompts.prompts)

    def eval_metrics(self, samples: np.ndarray) -> dict[str, float]:
        """Mean of every metric over host ``samples`` of the evaluation prompts (jitted once)."""
        batch = {k: v for k, v in self.eval_prompts.inputs.items()}
        return eval_means(self._eval_cache, self.metrics, self.frozen, samples, batch)

    @functools.cached_property
    def _eval_cache(self) -> dict:
        return {}

    # --- derived worlds --------------------------------------------------------------------------
    def placed(self, frozen: Mapping[str, Any]) -> World:
        """The same world with its frozen tree replaced (e.g. placed on a mesh)."""
        return dataclasses.replace(self, frozen=dict(frozen))

    def policy(self) -> nnx.Module:
        """The policy as a module (a fresh merge: changing it does not change the world)."""
        return nnx.merge(self.graphdefs["policy"], self.params)

    def with_lora(self, lora: LoraConfig, seed: int) -> tuple[World, nnx.State, list[str]]:
        """A copy whose policy carries LoRA adapters (only ``lora``'s target layers), the trainable
        adapters, and the adapted layer paths. The base weights move to ``frozen[BASE_KEY]``;
        ``params`` of the returned world stay the base weights."""
        try:
            graphdef, adapters, base, paths = split_lora(self.policy(), lora, seed)
        except ConfigError as e:  # no layer matches: the message lists real layer paths
            raise ConfigError(f"--config.{e}" if str(e).startswith("lora.") else str(e)) from None
        new = dataclasses.replace(self, graphdefs={**self.graphdefs, "policy": graphdef},
                                  frozen={**self.frozen, BASE_KEY: base}, lora=lora)
        return new, adapters, paths

    def full_params(self, trainable: Any, frozen: Mapping[str, Any]) -> Any:
        """The policy's full state from the trained parameters: themselves, or under LoRA the
        adapters merged with the frozen base weights."""
        return merge_lora_state(trainable, frozen) if self.lora.enabled else trainable


def adapted_policy(policy: nnx.Module, lora: LoraConfig, seed: int) -> tuple[nnx.Module, list[str]]:
    """A copy of ``policy`` (sharing its weight arrays) with adapters attached; the original is not
    modified. Returns the copy and the adapted layer paths."""
    model = nnx.clone(policy)
    paths = add_lora(model, lora, nnx.Rngs(params=jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)))
    return model, paths


def split_lora(policy: nnx.Module, lora: LoraConfig, seed: int) -> tuple[Any, nnx.State, nnx.State, list[str]]:
    """``policy`` with adapters, split into (graphdef, trainable adapters, frozen base weights, adapted
    layer paths)."""
    model, paths = adapted_policy(policy, lora, seed)
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, adapters, base, paths


def merge_lora_state(adapters: Any, frozen: Mapping[str, Any]) -> nnx.State:
    """A LoRA policy's full state: the trained adapters with the base weights in ``frozen[BASE_KEY]``."""
    return nnx.merge_state(adapters, frozen[BASE_KEY])
