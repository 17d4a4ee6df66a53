"""The ViPO iteration as one jitted function: rollout -> decode -> reward -> PSM -> advantages ->
policy update (gradient accumulation and several optimizer updates inside the same jit).

Models enter as pure callables over parameter pytrees, so this file knows nothing about Flux or
Wan: ``velocity_fn(params, x, sigma, cond)`` is the policy, ``decode_fn(frozen, x0)`` gives images
in [0, 1], ``reward_fns[name](frozen, images, batch)`` gives (B,) rewards, ``feature_fn(frozen,
images)`` gives the PSM backbone's patch tokens. The policy's log-probabilities in rollout and in
training go through the same function (``rl.sde.transition_logprob``) at the same micro-batch
shape; the first update takes its old log-probs from its own pass (the parameters are the
rollout's), so the importance ratio is exactly 1 there by construction, and the float32 gap to the
rollout's values is logged (``logp/rollout_gap``).

Sharding: the function is mesh-agnostic. Jit it with :func:`jit_train_step` (shardings from
``vipo_jax.sharding``) and trace/call it inside ``vipo_jax.sharding.activate(mesh, rules)``; the
per-sample arrays are then constrained to the ``batch`` axes (``data x fsdp``), so a group's G
samples may live on different devices: group statistics are reductions over global arrays and
stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vipo_jax import rl
from vipo_jax.sharding.rules import constrain, constrain_batch
from vipo_jax.training.ema import update_ema
from vipo_jax.training.step_config import StepConfig

Array = jax.Array


def split_micro_batches(a: Array, n: int, axis: int = 0) -> Array:
    """Axis ``axis`` of ``a`` (B samples) -> ``(n, B // n)``: micro-batch ``j`` holds samples
    ``j, j + n, j + 2n, ...``. Strided rather than contiguous, so that when the samples are split
    over devices (the ``batch`` mesh axes) every device keeps its own samples: taking a
    micro-batch never moves data between devices. Rollout and training use the same split."""
    b = a.shape[axis]
    a = a.reshape(a.shape[:axis] + (b // n, n) + a.shape[axis + 1:])
    a = jnp.swapaxes(a, axis, axis + 1)
    return constrain(a, (None,) * (axis + 1) + ("batch",) + (None,) * (a.ndim - axis - 2))


def merge_micro_batches(a: Array, axis: int = 0) -> Array:
    """Inverse of :func:`split_micro_batches`."""
    a = jnp.swapaxes(a, axis, axis + 1)
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def in_micro_batches(fn: Callable, x_batch: int, mb: int):
    """Run ``fn(*batched_args)`` in micro-batches of ``mb`` along axis 0 (same shape every call)."""
    if mb in (0, x_batch):
        return fn

    def run(*args):
        split = jax.tree.map(lambda a: split_micro_batches(a, x_batch // mb), args)
        out = jax.lax.map(lambda a: fn(*constrain_batch(a)), split)
        return constrain_batch(jax.tree.map(merge_micro_batches, out))

    return run


def repeat_groups(tree: Any, group_size: int) -> Any:
    """Per-prompt arrays (P, ...) -> per-sample arrays (P*G, ...), prompt-major."""
    return jax.tree.map(lambda a: jnp.repeat(a, group_size, axis=0), tree)


def make_rollout_and_score(cfg: StepConfig, *, velocity_fn: Callable, decode_fn: Callable,
                           reward_fns: Mapping[str, Callable], feature_fn: Callable | None,
                           latent_shape: tuple[int, ...]) -> Callable:
    """``(policy_params, frozen, batch, k_noise, k_sde) -> rollout`` (no gradient): sample the group,
    decode, score, build the PSM maps and the group advantages. Returns a dict of per-sample arrays:
    ``cond`` (P*G rows), ``latents`` (S+1, B, *latent), ``old_logp`` (S, B, *latent), ``images``,
    ``rewards`` {name: (B,)}, ``map`` (B, *positions) or None (GRPO), ``adv`` (R, B) or (R, B, *positions)."""
    G = cfg.group_size
    sigmas = rl.sigma_schedule(cfg.num_steps, cfg.shift)
    names = tuple(n for n, _ in cfg.rewards)
    video = len(latent_shape) == 4

    windowed_rollout = cfg.windowed or cfg.ode_solver != "euler" or cfg.ratio_norm

    def rollout_and_score(policy, frozen, batch, k_noise, k_sde, mask=None):
        """``mask``: the (S,) SDE steps of a windowed rollout (None: every trainable step)."""
        P = jax.tree.leaves(batch["cond"])[0].shape[0]
        B = P * G
        mb = cfg.micro_batch or B // cfg.num_updates
        cond = constrain_batch(repeat_groups(batch["cond"], G))

        # --- rollout (no gradient), in micro-batches of the training shape --------------------
        if cfg.init_same_noise:  # all G samples of a prompt start from the same noise
            x_init = rl.initial_noise(k_noise, P, G, latent_shape)
        else:
            x_init = jax.random.normal(k_noise, (B,) + tuple(latent_shape), jnp.float32)
        x_init = constrain_batch(x_init)
        vel_mb = in_micro_batches(lambda x, s, c: velocity_fn(policy, x, s, c), B, mb)
        if windowed_rollout:  # the SDE in a window (MixGRPO); the rollout policy's means for RatioNorm
            ro = rl.rollout_windowed(vel_mb, x_init, cond, sigmas, cfg.eta, k_sde,
                                     rl.sde_mask(0, cfg.num_steps, 0) if mask is None else mask,
                                     ode_solver=cfg.ode_solver, return_means=cfg.ratio_norm)
        else:
            ro = rl.rollout(vel_mb, x_init, cond, sigmas, cfg.eta, k_sde, stochastic_last=cfg.stochastic_last_step)
        latents = jax.lax.stop_gradient(ro["latents"])  # (S+1, B, *latent)
        old_logp = jax.lax.stop_gradient(ro["log_probs"])  # (S, B, *latent)
        means = jax.lax.stop_gradient(ro["means"]) if cfg.ratio_norm else None

        # --- decode, reward, PSM ---------------------------------------------------------------
        images = constrain_batch(decode_fn(frozen, constrain_batch(ro["x0"])))
        per_sample = constrain_batch(repeat_groups({k: v for k, v in batch.items() if k != "cond"}, G))
        rewards = {name: fn(frozen, images, per_sample).astype(jnp.float32) for name, fn in reward_fns.items()}
        if cfg.psm is not None and feature_fn is not None:
            feats = feature_fn(frozen, images, ro["x0"])
            if video:
                amap = rl.psm_map_video(feats, tuple(latent_shape[:3]), cfg.psm)
            else:
                amap = rl.psm_map(feats, tuple(latent_shape[:2]), cfg.psm)
            amap = rl.control_map(amap, cfg.psm.control, G)
        else:
            amap = None  # plain GRPO: M = 1

        # --- advantages, one per reward (R, B) or (R, B, *positions) -----------------------------
        if cfg.map_target == "advantage":
            adv = jnp.stack([rl.group_advantages(rewards[n], G) for n in names])
        else:
            m = amap if amap is not None else jnp.ones((B,) + tuple(latent_shape[:-1]), jnp.float32)
            if cfg.map_target == "reward":
                adv = jnp.stack([rl.pixel_rewards_to_advantages(rewards[n], m, G) for n in names])
            else:  # reward_and_advantage: the official Wan + HPS path (group statistics of r*M, then x M)
                adv = jnp.stack([rl.pixel_rewards_to_advantages(rewards[n], m, G, stats="group") * m for n in names])
        return {"cond": cond, "latents": latents, "old_logp": old_logp, "images": images, "rewards": rewards,
                "trained_rewards": {n: rewards[n] for n in names}, "map": amap, "adv": adv, "means": means}

    return rollout_and_score


def _all_finite(tree: Any) -> Array:
    """Whether every float leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
              if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_AUX = ("clip_fraction", "approx_kl", "ratio_mean", "adv_abs_mean", "ratio_dev", "rollout_gap")


def make_policy_update(cfg: StepConfig, *, velocity_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, nonfinite, full, rollout, timesteps) -> (params, opt_state, nonfinite,
    per-update metrics)``: ``cfg.num_updates`` optimizer updates, each over its chunk of the samples,
    with gradients accumulated over (trained timestep x micro-batch) by a scan. ``full(p)`` gives
    the policy's full parameters from the trained ones (LoRA: adapters + frozen base). An update
    with a non-finite loss or gradient is skipped (parameters and optimizer state kept)."""
    sigmas = rl.sigma_schedule(cfg.num_steps, cfg.shift)
    K = cfg.num_train_timesteps
    coefs = jnp.asarray([c for _, c in cfg.rewards], jnp.float32)
    step_weight_ref = rl.mean_step_weight(sigmas)

    def update(params, opt_state, nonfinite, full, ro, ts):
        B = ts.shape[0]
        chunk = B // cfg.num_updates
        mb = cfg.micro_batch or chunk
        amap = ro["map"]
        # Per-sample arrays as the J = B / mb micro-batches of the rollout, (J, mb, ...) with the mb
        # axis on the batch mesh axes: taking micro-batch j indexes an unsplit axis (no communication).
        n_j = B // mb

        def by_mb(a, axis=0):
            return split_micro_batches(a, n_j, axis)

        ts_j, cond_j = by_mb(ts), jax.tree.map(by_mb, ro["cond"])
        lat_j, old_j = by_mb(ro["latents"], 1), by_mb(ro["old_logp"], 1)
        adv_j, amap_j = by_mb(ro["adv"], 1), None if amap is None else by_mb(amap)
        means_j = by_mb(ro["means"], 1) if cfg.ratio_norm else None

        def at_t(a, t):
            """``a[t[i], i]`` for each sample i of a (T, mb, ...) micro-batch (a batch-parallel gather)."""
            return jnp.take_along_axis(a, t.reshape((1, -1) + (1,) * (a.ndim - 2)), axis=0)[0]

        def item_loss(p, k, j, first_update):
            """Loss of micro-batch ``j`` at its samples' k-th trained transition."""
            t = ts_j[j][:, k]
            c = constrain_batch(jax.tree.map(lambda a: a[j], cond_j))
            lat = lat_j[:, j]
            x_t, x_next = constrain_batch((at_t(lat, t), at_t(lat, t + 1)))
            vel = lambda x, s, cc: velocity_fn(full(p), x, s, cc)  # noqa: E731
            if cfg.ratio_norm:
                logp, mean, std = rl.guard_transition(vel, x_t, x_next, sigmas[t], sigmas[t + 1], cfg.eta, c)
            else:
                logp = rl.step_logprob(vel, x_t, x_next, sigmas[t], sigmas[t + 1], cfg.eta, c)
            # Before the first update the parameters are the rollout's, so the old log-prob is this
            # very value: the ratio is exactly 1 by construction. Later updates use the rollout's
            # log-probs; their float32 agreement with the recomputation is logged as rollout_gap.
            rollout_lp = constrain_batch(at_t(old_j[:, j], t))
            gap = jnp.max(jnp.abs(rl.reduce_logprob(rollout_lp, cfg.logprob_reduction)
                                  - rl.reduce_logprob(jax.lax.stop_gradient(logp), cfg.logprob_reduction)))
            gap = jnp.where(first_update, gap, 0.0)  # later updates differ by the policy change itself
            logp_old = jnp.where(first_update, jax.lax.stop_gradient(logp), rollout_lp)
            logp_new, adv, amap_k, target, clip_max = logp, adv_j[:, j], None if amap_j is None else amap_j[j], \
                cfg.loss_map_target, cfg.adv_clip_max
            if cfg.ratio_norm:  # GRPO-Guard: s*(log-ratio) + dmu^2/(2s), fed as the log-ratio against 0
                mean_old = jnp.where(first_update, jax.lax.stop_gradient(mean), at_t(means_j[:, j], t))
                logp_new = rl.ratio_norm_elementwise(logp, logp_old, mean, mean_old, std)
                logp_old = jnp.zeros_like(logp_new)
                if cfg.ratio_norm_reweight:  # 1/dt loss weights (mean 1): the map and clamp applied first
                    w = rl.step_weight(sigmas[t], sigmas[t + 1], reference=step_weight_ref)
                    adv = jnp.stack([rl.pixel_advantages(a, amap_k, map_target=cfg.loss_map_target,
                                                         adv_clip_max=cfg.adv_clip_max) for a in adv])
                    adv = adv * w.reshape((1, -1) + (1,) * (adv.ndim - 2))
                    amap_k, target, clip_max = None, "reward", jnp.inf
            loss, m = rl.policy_loss(
                logp_new, logp_old, adv, amap_k, logprob_reduction=cfg.logprob_reduction, map_target=target,
                clip_range=cfg.clip_range, adv_clip_max=clip_max, reward_coefs=coefs)
            aux = {"clip_fraction": m["clip_fraction"], "approx_kl": m["approx_kl"],
                   "ratio_mean": m["ratio_mean"], "adv_abs_mean": m["adv_abs_mean"],
                   "ratio_dev": jnp.maximum(m["ratio_max"] - 1.0, 1.0 - m["ratio_min"]), "rollout_gap": gap}
            return loss, aux

        grad_fn = jax.value_and_grad(item_loss, has_aux=True)
        n_mb = chunk // mb
        n_items = K * n_mb

        def one_update(carry, u):
            p, opt_state, nonfinite = carry

            def acc(c, km):
                g_sum, l_sum, aux_acc = c
                k, m = km // n_mb, km % n_mb
                (loss, aux), g = grad_fn(p, k, u * n_mb + m, u == 0)  # micro-batch m of update u
                g_sum = jax.tree.map(jnp.add, g_sum, g)
                maxed = {k_: jnp.maximum(aux_acc[k_], aux.pop(k_)) for k_ in ("ratio_dev", "rollout_gap")}
                aux_acc = {**jax.tree.map(jnp.add, {k_: aux_acc[k_] for k_ in aux}, aux), **maxed}
                return (g_sum, l_sum + loss, aux_acc), None

            zeros = jax.tree.map(jnp.zeros_like, p)
            aux0 = {k_: jnp.zeros((), jnp.float32) for k_ in _AUX}
            (g_sum, l_sum, aux_acc), _ = jax.lax.scan(
                acc, (zeros, jnp.zeros((), jnp.float32), aux0), jnp.arange(n_items))
            grads = jax.tree.map(lambda g: g / n_items, g_sum)
            gnorm = optax.tree.norm(grads)
            updates, new_opt = optimizer.update(grads, opt_state, p)
            new_p = optax.apply_updates(p, updates)
            # a finite gradient can still overflow the update (a huge learning rate, Adam's state):
            # the new parameters and optimizer state are checked too, so nothing non-finite is kept
            finite = jnp.isfinite(gnorm) & jnp.isfinite(l_sum) & _all_finite((new_p, new_opt))
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            p, opt_state = keep(new_p, p), keep(new_opt, opt_state)
            nonfinite = jnp.where(finite, 0, nonfinite + 1)
            dev, gap = aux_acc.pop("ratio_dev"), aux_acc.pop("rollout_gap")
            m = {"loss": l_sum / n_items, "grad_norm": gnorm, "skipped": (~finite).astype(jnp.float32),
                 "ratio_dev": dev, "rollout_gap": gap, **{k_: v / n_items for k_, v in aux_acc.items()}}
            return (p, opt_state, nonfinite), m

        (params, opt_state, nonfinite), ms = jax.lax.scan(
            one_update, (params, opt_state, nonfinite), jnp.arange(cfg.num_updates))
        return params, opt_state, nonfinite, ms

    return update


def step_metrics(ms: dict, ro: dict, nonfinite: jax.Array, group_size: int) -> dict:
    """The iteration's metrics from the per-update metrics and the rollout."""
    metrics = {k: jnp.mean(v) for k, v in ms.items() if k not in ("skipped", "ratio_dev", "rollout_gap")}
    metrics["logp/rollout_gap"] = jnp.max(ms["rollout_gap"])
    metrics["ratio_dev_first_update"] = ms["ratio_dev"][0]
    # the first update's loss and gradient come from the rollout's own parameters (no optimizer step
    # has acted yet): where two runs of the same iteration on different meshes can first differ
    metrics["loss_first_update"] = ms["loss"][0]
    metrics["grad_norm_first_update"] = ms["grad_norm"][0]
    metrics["updates_skipped"] = jnp.sum(ms["skipped"])
    metrics["nonfinite_streak"] = nonfinite.astype(jnp.float32)
    for name, r in ro["rewards"].items():
        metrics[f"reward/{name}"] = jnp.mean(r)
        metrics[f"reward_std/{name}"] = jnp.std(r)
    for name, r in ro["trained_rewards"].items():  # groups whose rewards were all equal: advantages 0
        metrics[f"degenerate_groups/{name}"] = rl.degenerate_groups(r, group_size)
    metrics["map/mean"] = jnp.mean(ro["map"]) if ro["map"] is not None else jnp.float32(1.0)
    return metrics


def make_train_step(cfg: StepConfig, *, velocity_fn: Callable, decode_fn: Callable,
                    reward_fns: Mapping[str, Callable], feature_fn: Callable | None,
                    optimizer: optax.GradientTransformation, latent_shape: tuple[int, ...],
                    policy_params: Callable[[Any, Any], Any] | None = None, ema_decay: float = 0.0):
    """Build ``step(state, frozen, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``
    (:func:`jit_train_step`). It reads top to bottom: split the RNG, roll out and score
    (:func:`make_rollout_and_score`), pick the trained transitions, update the policy
    (:func:`make_policy_update`), summarise.

    ``state`` is ``{"params", "opt_state", "step", "rng", "nonfinite"}`` (plus ``"ema"`` when
    ``ema_decay > 0``); ``batch`` holds per-prompt conditioning ``batch["cond"]`` (a pytree with
    leading axis P) and per-prompt reward inputs (the reward functions see them repeated per sample).
    ``latent_shape`` is one sample's latent (H, W, C) (or (T, H, W, C) for video).

    ``policy_params(trainable, frozen)``: the policy's full parameters that ``velocity_fn`` takes,
    built from the trained ``state["params"]`` and the frozen tree (LoRA: adapters + frozen base
    weights, ``World.full_params``); only ``state["params"]`` is differentiated. None:
    ``state["params"]`` is the policy's full state.

    ``ema_decay > 0``: after the iteration's updates, ``state["ema"] <- d * ema + (1 - d) * params``
    (skipped when every update of the iteration was skipped as non-finite).
    """
    rollout_and_score = make_rollout_and_score(cfg, velocity_fn=velocity_fn, decode_fn=decode_fn,
                                               reward_fns=reward_fns, feature_fn=feature_fn,
                                               latent_shape=latent_shape)
    update = make_policy_update(cfg, velocity_fn=velocity_fn, optimizer=optimizer)
    sigmas = rl.sigma_schedule(cfg.num_steps, cfg.shift)

    def step(state, frozen, batch):
        full = (lambda p: p) if policy_params is None else (lambda p: policy_params(p, frozen))
        rng, k_noise, k_sde, k_ts = jax.random.split(state["rng"], 4)
        start, mask = None, None
        if cfg.windowed:  # MixGRPO: the SDE window of this iteration
            key = state["step"] if cfg.window_schedule == "sliding" else jax.random.fold_in(k_ts, 1)
            start = rl.window_start(key, cfg.num_steps, cfg.sde_window, cfg.window_schedule,
                                    stride=cfg.window_stride, every=cfg.window_every)
            mask = rl.sde_mask(start, cfg.num_steps, cfg.sde_window)
        ro = rollout_and_score(full(state["params"]), frozen, batch, k_noise, k_sde, mask)
        B = ro["latents"].shape[1]
        if cfg.windowed:
            ts = rl.window_train_timesteps(k_ts, B, start, cfg.sde_window, cfg.window_fraction)  # (B, K)
        else:
            ts = rl.sample_train_timesteps(k_ts, B, cfg.num_steps, cfg.timestep_fraction)  # (B, K)
        params, opt_state, nonfinite, ms = update(state["params"], state["opt_state"], state["nonfinite"], full,
                                                  ro, ts)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": rng, "nonfinite": nonfinite}
        if ema_decay > 0:
            new_state["ema"] = update_ema(state["ema"], params, ema_decay, jnp.any(ms["skipped"] == 0))
        metrics = step_metrics(ms, ro, nonfinite, cfg.group_size)
        if cfg.windowed:
            metrics.update(rl.window_metrics(start, sigmas, cfg.sde_window))
            metrics["window/trained_sde_fraction"] = rl.trained_sde_fraction(mask, ts)
        return new_state, metrics

    return step


def train_step_for(world: Any, cfg: StepConfig, optimizer: optax.GradientTransformation, *,
                   ema_decay: float = 0.0) -> Callable:
    """:func:`make_train_step` with a World's callables (LoRA-aware)."""
    return make_train_step(cfg, velocity_fn=world.velocity_fn, decode_fn=world.decode_fn,
                           reward_fns=world.rewards, feature_fn=world.feature_fn if world.has_backbone else None,
                           optimizer=optimizer, latent_shape=tuple(world.latent_shape),
                           policy_params=world.full_params if world.lora.enabled else None, ema_decay=ema_decay)


def jit_train_step(step: Callable, *, state_shardings: Any, frozen_shardings: Any, batch_shardings: Any,
                   mesh: jax.sharding.Mesh) -> Callable:
    """``jax.jit`` of a :func:`make_train_step` step with its in/out shardings and the state donated.

    ``state_shardings`` / ``frozen_shardings``: ``vipo_jax.sharding.param_shardings`` of the
    (abstract) state and frozen trees; ``batch_shardings``: of the global batch (per-prompt
    arrays split on their leading axis). Metrics come back replicated. Trace and call it inside
    ``vipo_jax.sharding.activate(mesh, rules)`` so the model's activation constraints apply."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_sampler(velocity_fn: Callable, decode_fn: Callable, num_steps: int, shift: float,
                 policy_params: Callable[[Any, Any], Any] | None = None, *, return_latents: bool = False):
    """Deterministic ODE sampling (eta = 0) for evaluation: (params, frozen, cond, noise) -> images
    (and the clean latents they were decoded from, with ``return_latents``). ``policy_params`` as in
    :func:`make_train_step` (the same merge the training step uses)."""
    sigmas = rl.sigma_schedule(num_steps, shift)

    def sample(params, frozen, cond, noise):
        if policy_params is not None:
            params = policy_params(params, frozen)
        ro = rl.rollout(lambda x, s, c: velocity_fn(params, x, s, c), noise, cond, sigmas, 0.0,
                        jax.random.PRNGKey(0), deterministic=True)
        images = decode_fn(frozen, ro["x0"])
        return (images, ro["x0"]) if return_latents else images

    return sample
