"""FLUX.1 world: the Flux DiT as the policy, its VAE as decoder, DINOv2 as the PSM backbone, and
the configured rewards, wired into the pure callables the train step composes.

``world="toy"`` loads the committed toy checkpoints (``vipo_jax/toy/assets``) and the toy prompts;
``world="real"`` loads a diffusers FLUX.1 folder (``--config.model.path``), a DINOv2 folder
(``--config.psm.backbone``) and reward checkpoints, and encodes the prompt file once into an
embedding cache next to it so the 4.7B T5 is not in memory during training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.training.step import StepConfig
from vipo_jax.training.validate import reward_spec
from vipo_jax.weights.loading import ShardingFn
from vipo_jax.worlds.flux_policy import flux_velocity

EVAL_SEED = 1234


def step_config(c: mlc.ConfigDict) -> StepConfig:
    s, t, p = c.sampling, c.train, c.psm
    return StepConfig(
        num_steps=s.num_steps, shift=s.shift, eta=s.eta, group_size=s.group_size,
        timestep_fraction=t.timestep_fraction, num_updates=t.num_updates, micro_batch=t.micro_batch,
        clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, logprob_reduction=t.logprob_reduction,
        map_target=t.map_target, psm_enabled=bool(p.enabled), psm_num_components=p.num_components,
        psm_sign_rule=p.sign_rule, psm_aggregation=p.aggregation, psm_smooth_sigma=p.smooth_sigma,
        psm_normalize_mean=bool(p.normalize_mean), rewards=tuple(reward_spec(c)),
        init_same_noise=bool(s.init_same_noise))


class _Loader:
    """A PromptLoader over this process's prompts, with ``next()`` returning global indices."""

    def __init__(self, num_records: int, batch_size: int, seed: int):
        from vipo_jax.data.prompts import PromptLoader

        self._loader = PromptLoader(num_records=num_records, batch_size=batch_size, seed=seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    def next(self) -> np.ndarray:
        return np.asarray(next(self._loader)["index"])

    def state(self) -> dict:
        return self._loader.state()

    def restore(self, state: dict) -> None:
        self._loader.restore(state)


@dataclasses.dataclass
class FluxWorld:
    config: mlc.ConfigDict
    policy: nnx.Module
    graphdefs: dict
    frozen: dict
    prompts: list[str]
    cond: dict  # per prompt: t5 (N, L, D), pooled (N, P), and reward inputs
    eval_prompts: list[str]
    eval_cond: dict
    latent_shape: tuple[int, int, int]
    step_config: StepConfig
    reward_fns: dict
    eval_fns: dict
    main_reward: str
    png_scale: int = 1
    guidance: float | None = None
    # prompts -> a per-prompt table like ``cond`` (conditioning and metric inputs), for evaluation
    encode: Callable[[list[str]], dict] | None = None
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    # --- the pure callables of the train step ----------------------------------------------------
    def velocity_fn(self, params, x, sigma, cond):
        model = nnx.merge(self.graphdefs["policy"], params)
        g = None if self.guidance is None else jnp.full((x.shape[0],), self.guidance, jnp.float32)
        return flux_velocity(model, x, sigma, cond["t5"], cond["pooled"], g)

    def decode_fn(self, frozen, x0):
        from vipo_jax.models.vae.model import decode_to_unit

        return decode_to_unit(nnx.merge(self.graphdefs["vae"], frozen["vae"]), x0)

    def feature_fn(self, frozen, images):
        from vipo_jax.models.dinov2.model import patch_tokens, preprocess

        dino = nnx.merge(self.graphdefs["dinov2"], frozen["dinov2"])
        pixels = preprocess(images, images.shape[1:3], patch_size=dino.config.patch_size)
        return patch_tokens(dino, pixels)[0]

    # --- data ----------------------------------------------------------------------------------
    def prompt_loader(self, c: mlc.ConfigDict) -> _Loader:
        return _Loader(len(self.prompts), c.sampling.prompts_per_iter, c.seed)

    def batch(self, indices: np.ndarray) -> dict:
        return self.batch_from(self.cond, indices)

    @staticmethod
    def batch_from(table: dict, indices: np.ndarray) -> dict:
        """Rows ``indices`` of a per-prompt table as the step's batch: ``{"cond": ..., **metric inputs}``."""
        take = {k: jnp.asarray(np.asarray(v)[indices]) for k, v in table.items()}
        return {"cond": {"t5": take.pop("t5"), "pooled": take.pop("pooled")}, **take}

    def eval_inputs(self, c: mlc.ConfigDict):
        n = len(self.eval_prompts)
        noise = jax.random.normal(jax.random.PRNGKey(EVAL_SEED), (n,) + tuple(self.latent_shape))
        cond = {"t5": jnp.asarray(self.eval_cond["t5"]), "pooled": jnp.asarray(self.eval_cond["pooled"])}
        return cond, noise, self.eval_prompts

    def eval_metrics(self, images: np.ndarray, prompts: list[str]) -> dict:
        """Mean of every eval metric over host ``images`` of the evaluation prompts."""
        from vipo_jax.worlds.metrics import eval_means

        batch = {k: v for k, v in self.eval_cond.items() if k not in ("t5", "pooled")}
        return eval_means(self._jitted, self.eval_fns, self.frozen, images, batch)


def _toy_rewards(world_frozen_graphdefs: dict, names: list[str]) -> tuple[dict, dict]:
    """Toy rewards (redness, toy CLIP score) and eval metrics (+ digit accuracy, colour match)."""
    from vipo_jax.models.clip.model import l2_normalize
    from vipo_jax.rewards.clip_scores import preprocess
    from vipo_jax.toy.rewards import color_match, redness

    g = world_frozen_graphdefs

    def toy_clip(frozen, images, batch):
        clip = nnx.merge(g["clip"], frozen["clip"])
        img = l2_normalize(clip.get_image_features(preprocess(images, clip.cfg.vision_config.image_size)))
        txt = l2_normalize(clip.get_text_features(batch["clip_ids"]))
        return jnp.sum(img * txt, axis=-1)

    def red(frozen, images, batch):
        return redness(images)

    def digit_accuracy(frozen, images, batch):
        clf = nnx.merge(g["classifier"], frozen["classifier"])
        return (jnp.argmax(clf(images), -1) == batch["labels"][:, 0]).astype(jnp.float32)

    def colors(frozen, images, batch):
        return color_match(images, batch["labels"][:, 1], batch["labels"][:, 2])

    known = {"redness": red, "toy_clip": toy_clip}
    for n in names:
        if n not in known:
            raise ConfigError(f"reward {n!r} is not available in the toy world (use redness or toy_clip)")
    train = {n: known[n] for n in names}
    # monitor every toy metric during training too (cheap), so ViPO vs GRPO can be compared
    train.update({n: f for n, f in known.items() if n not in train})
    train["digit_accuracy"] = digit_accuracy
    evals = {**known, "digit_accuracy": digit_accuracy, "color_match": colors}
    return train, evals


def build_toy_world(c: mlc.ConfigDict) -> FluxWorld:
    from vipo_jax.toy import assets
    from vipo_jax.toy.digits import prompt_combos, prompt_set

    root = assets.assets_dir(c.model.path or None)
    if c.sampling.height != 64 or c.sampling.width != 64:
        raise ConfigError("the toy world generates 64x64 images: keep --config.sampling.height/width at 64")
    policy = assets.load("transformer", root, param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                         remat=c.model.remat, attention=c.model.attention)
    frozen_models = {"vae": assets.load("vae", root), "dinov2": assets.load("dinov2", root),
                     "clip": assets.load("clip", root), "classifier": assets.load("classifier", root)}
    graphdefs, frozen = {"policy": nnx.graphdef(policy)}, {}
    for k, m in frozen_models.items():
        graphdefs[k], frozen[k] = nnx.split(m)
    t5 = assets.load("text_encoder_2", root)
    train_prompts, train_combos = prompt_set("train"), prompt_combos("train")
    # fixed evaluation prompts: half in-domain, half held-out (out-of-domain) combinations
    n_out = c.log.num_eval_prompts // 2
    n_in = c.log.num_eval_prompts - n_out
    held_out = prompt_combos("eval")
    ev_combos = (train_combos[:: max(1, len(train_combos) // max(1, n_in))][:n_in]
                 + held_out[:: max(1, len(held_out) // max(1, n_out))][:n_out])
    from vipo_jax.toy.digits import caption

    eval_prompts = [caption(*t) for t in ev_combos]
    cond = assets.encode_prompts(train_prompts, root, t5=t5, clip=frozen_models["clip"])
    cond["labels"] = np.asarray(train_combos, np.int32)
    eval_cond = assets.encode_prompts(eval_prompts, root, t5=t5, clip=frozen_models["clip"])
    eval_cond["labels"] = np.asarray(ev_combos, np.int32)
    names = [n for n, _ in reward_spec(c)]
    reward_fns, eval_fns = _toy_rewards(graphdefs, names)

    def encode(texts: list[str]) -> dict:
        from vipo_jax.toy.digits import parse_caption

        labels = np.asarray([parse_caption(t) for t in texts], np.int32)
        return {**assets.encode_prompts(texts, root, t5=t5, clip=frozen_models["clip"]), "labels": labels}

    vae_cfg = frozen_models["vae"].cfg
    f = vae_cfg.downsample_factor
    latent_shape = (c.sampling.height // f, c.sampling.width // f, vae_cfg.latent_channels)
    return FluxWorld(config=c, policy=policy, graphdefs=graphdefs, frozen=frozen, prompts=train_prompts,
                     cond=cond, eval_prompts=eval_prompts, eval_cond=eval_cond, latent_shape=latent_shape,
                     step_config=step_config(c), reward_fns=reward_fns, eval_fns=eval_fns, main_reward=names[0],
                     png_scale=2, guidance=c.sampling.guidance if policy.cfg.guidance_embeds else None,
                     encode=encode)


REAL_HELP = """\
FLUX.1 weights not found{where}.
Download the diffusers folder of black-forest-labs/FLUX.1-{variant} (it has transformer/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/), e.g.
    huggingface-cli download black-forest-labs/FLUX.1-{variant} --local-dir /data/FLUX.1-{variant}
then pass --config.model.path=/data/FLUX.1-{variant}. Also needed: --config.psm.backbone=<facebook/dinov2-large
folder>, the reward checkpoints (--config.rewards.hpsv21=<converted HPS_v2.1 safetensors>, see
`python -m vipo_jax.convert hps --help`) and --config.data.prompts=<prompts.txt>."""


def check_real_paths(c: mlc.ConfigDict) -> Path:
    root = Path(c.model.path) if c.model.path else None
    if root is None or not root.is_dir():
        where = f" at {root}" if root else " (--config.model.path is empty)"
        raise CheckpointError(REAL_HELP.format(where=where, variant=c.model.variant))
    missing = [d for d in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
               if not (root / d).is_dir()]
    if missing:
        raise CheckpointError(REAL_HELP.format(where=f" completely in {root}: missing {', '.join(missing)}",
                                               variant=c.model.variant))
    if c.psm.enabled and not (c.psm.backbone and Path(c.psm.backbone).is_dir()):
        raise CheckpointError(f"DINOv2 backbone folder not found: --config.psm.backbone={c.psm.backbone!r}. "
                              "Download facebook/dinov2-large (or disable the PSM with --config.psm.enabled=False).")
    if not c.data.prompts:
        raise DataError("--config.data.prompts is empty: give a prompts file (one prompt per line, or JSONL)")
    return root


def _image_reward(c: mlc.ConfigDict, path: str, sharding: ShardingFn | None = None):
    """ImageReward (BLIP) as a reward: (graphdef, params, fn(params, images, batch), prompts -> inputs).
    Its prompts go through BLIP's BERT tokenizer (``rewards.image_reward_tokenizer``, default the
    converted folder's ``tokenizer/``), so its inputs are ``ir_ids`` / ``ir_mask``."""
    from vipo_jax.rewards.image_reward import ImageRewardScorer

    tok = c.rewards.get("image_reward_tokenizer", "") or None
    scorer = ImageRewardScorer.from_folder(
        path, tokenizer=tok, param_dtype="bfloat16" if c.model.dtype == "bfloat16" else "float32",
        sharding=sharding)

    def fn(params, images, batch):
        return scorer.score_fn(params, images, batch["ir_ids"], batch["ir_mask"])

    def inputs(texts: list[str]) -> dict:
        ids, mask = scorer.tokenize(texts)
        return {"ir_ids": ids, "ir_mask": mask}

    return scorer.graphdef, scorer.params, fn, inputs


def _real_rewards(c: mlc.ConfigDict, root: Path,
                  sharding: ShardingFn | None = None) -> tuple[dict, dict, dict, Callable[[list[str]], dict]]:
    """The configured reward models: (score fns, graphdefs, frozen params, prompts -> their inputs)."""
    from vipo_jax.models.clip import load_clip
    from vipo_jax.rewards.clip_scores import clip_score, hps_v21_score, pickscore
    from vipo_jax.text.tokenizers import load_tokenizer, tokenize

    tok = load_tokenizer(root / "tokenizer")
    graphdefs, frozen, fns = {}, {}, {}
    input_fns: list[Callable[[list[str]], dict]] = [lambda texts: {"reward_ids": tokenize(tok, texts, 77)[0]}]
    kinds = {"hpsv21": hps_v21_score, "pickscore": pickscore, "clip_score": clip_score}
    for name, _ in reward_spec(c):
        if name not in kinds and name != "image_reward":
            raise ConfigError(f"reward {name!r} is a toy-world reward; use hpsv21, pickscore, clip_score or "
                              "image_reward")
        path = c.rewards[name]
        if not path or not Path(path).exists():
            raise CheckpointError(f"reward model for {name} not found: --config.rewards.{name}={path!r}")
        if name == "image_reward":
            graphdefs[name], frozen[f"reward_{name}"], ir_fn, ir_inputs = _image_reward(c, path, sharding)
            fns[name] = lambda frozen_, images, batch, f=ir_fn: f(frozen_["reward_image_reward"], images, batch)
            input_fns.append(ir_inputs)
            continue
        model = load_clip(path, param_dtype="bfloat16" if c.model.dtype == "bfloat16" else "float32",
                          sharding=sharding)
        graphdefs[name], frozen[f"reward_{name}"] = nnx.split(model)

        def fn(frozen_, images, batch, name=name, score=kinds[name]):
            return score(nnx.merge(graphdefs[name], frozen_[f"reward_{name}"]), images, batch["reward_ids"])

        fns[name] = fn

    def inputs(texts: list[str]) -> dict:
        out: dict = {}
        for f in input_fns:
            out.update(f(texts))
        return out

    return fns, graphdefs, frozen, inputs


def build_real_world(c: mlc.ConfigDict, sharding: ShardingFn | None = None) -> FluxWorld:
    from vipo_jax.data.prompts import load_prompts
    from vipo_jax.models.dinov2 import load_dinov2
    from vipo_jax.models.flux import load_flux_transformer
    from vipo_jax.models.vae import load_vae
    from vipo_jax.text.prompt_cache import PromptEncoder, build_cache, cache_path_for, load_cache

    root = check_real_paths(c)
    prompts = load_prompts(c.data.prompts, c.data.cache_dir or None).prompts()
    eval_prompts = (load_prompts(c.data.eval_prompts, c.data.cache_dir or None).prompts()
                    if c.data.eval_prompts else prompts[: c.log.num_eval_prompts])[: c.log.num_eval_prompts]
    tag = f"flux-{c.model.variant}-{c.sampling.max_text_len}-{c.model.dtype}"

    def new_encoder() -> PromptEncoder:
        return PromptEncoder.from_flux(root, c.model.variant, dtype=c.model.dtype, param_dtype=c.model.dtype,
                                       max_sequence_length=c.sampling.max_text_len)

    cache, eval_cache_path = cache_path_for(c.data.prompts, tag), cache_path_for(c.data.prompts, tag + "-eval")
    try:
        embeds = load_cache(cache, prompts)
        eval_embeds = load_cache(eval_cache_path, eval_prompts)
    except DataError:
        encoder = new_encoder()
        embeds = build_cache(prompts, encoder, cache)
        eval_embeds = build_cache(eval_prompts, encoder, eval_cache_path)
        del encoder
    policy = load_flux_transformer(root / "transformer", param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                                   remat=c.model.remat, attention=c.model.attention, sharding=sharding)
    vae = load_vae(root / "vae", dtype=c.model.dtype, sharding=sharding)
    graphdefs = {"policy": nnx.graphdef(policy)}
    frozen = {}
    graphdefs["vae"], frozen["vae"] = nnx.split(vae)
    if c.psm.enabled:
        graphdefs["dinov2"], frozen["dinov2"] = nnx.split(load_dinov2(c.psm.backbone, dtype=c.model.dtype,
                                                                      sharding=sharding))
    reward_fns, rg, rf, reward_inputs = _real_rewards(c, root, sharding)
    graphdefs.update(rg)
    frozen.update(rf)
    f = vae.cfg.downsample_factor
    latent_shape = (c.sampling.height // f, c.sampling.width // f, vae.cfg.latent_channels)
    names = [n for n, _ in reward_spec(c)]
    cond = {"t5": embeds.t5, "pooled": embeds.pooled, **reward_inputs(prompts)}
    eval_cond = {"t5": eval_embeds.t5, "pooled": eval_embeds.pooled, **reward_inputs(eval_prompts)}

    def encode(texts: list[str]) -> dict:
        """Encodes with a freshly loaded T5 (evaluation only: training reads the cache)."""
        t5, pooled = new_encoder().encode(texts)
        return {"t5": t5, "pooled": pooled, **reward_inputs(texts)}

    return FluxWorld(config=c, policy=policy, graphdefs=graphdefs, frozen=frozen, prompts=prompts, cond=cond,
                     eval_prompts=eval_prompts, eval_cond=eval_cond, latent_shape=latent_shape,
                     step_config=step_config(c), reward_fns=reward_fns, eval_fns=dict(reward_fns),
                     main_reward=names[0], png_scale=1,
                     guidance=c.sampling.guidance if policy.cfg.guidance_embeds else None, encode=encode)


def build_flux_world(c: mlc.ConfigDict, sharding: ShardingFn | None = None) -> Any:
    """``sharding`` (e.g. ``vipo_jax.sharding.LogicalSharding``) places the real checkpoints as they
    load; the toy models are tiny and the train loop places them (and every world's policy and
    ``frozen`` tree) by the same rules."""
    return build_toy_world(c) if c.world == "toy" else build_real_world(c, sharding)
