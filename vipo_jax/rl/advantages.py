"""Group-relative advantages (docs/METHOD.md §2) and the "map applied to reward" ablation (docs/METHOD.md §4).

Batches are prompt-major: sample ``b`` belongs to group ``b // group_size`` (see
:func:`vipo_jax.rl.timesteps.initial_noise`). Statistics use the unbiased std (ddof=1) as torch's
``.std()`` in DanceGRPO/ViPO, and ``eps`` is added to the std (not under the square root).

Degenerate groups: the rewards are first centred on one of the group's own values (its first
sample), which is exact for equal or nearby float32 values. A group whose G rewards are all equal
(a saturated reward) therefore gets advantages of exactly 0, where the plain formula's float32
mean, one ulp off, divided by 0 + eps, gives |A| up to ~1 (the official code's behaviour): such a
group pushes the policy nowhere. Near-ties keep their true, small differences.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vipo_jax.errors import ConfigError


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    group_size = int(group_size)
    if group_size < 2:
        raise ConfigError(f"group_size must be >= 2 for a group-relative advantage, got {group_size}")
    if x.shape[0] % group_size:
        raise ConfigError(f"batch {x.shape[0]} is not a multiple of group_size {group_size}")
    return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def _normalise(g: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """``(g - mean) / (std + eps)`` over ``axes`` of grouped values ``g`` (P, G, ...), centred first on
    each group's first value (exact for equal or nearby floats), so that an all-equal group gives
    exactly 0."""
    d = g - g[:, :1]
    mean = jnp.mean(d, axis=axes, keepdims=True)
    std = jnp.std(d, axis=axes, keepdims=True, ddof=1)
    return jnp.where(std == 0, 0.0, (d - mean) / (std + eps))  # a NaN reward stays NaN (the update is skipped)


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-8) -> jax.Array:
    """``A_i = (r_i - mean_g r) / (std_g r + eps)`` within each group of G; ``(B,)`` float32; exactly
    0 for a group whose rewards are all equal (module docstring).

    The result is not clipped here: the ±adv_clip_max clamp is applied after the pixel map, in the
    loss (docs/METHOD.md §2), as the official code does."""
    r = _grouped(jnp.asarray(rewards, jnp.float32), group_size)
    return _normalise(r, (1,), eps).reshape(-1)


def degenerate_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """The number of groups whose G rewards are all equal (their advantages are 0), a float32 scalar."""
    r = _grouped(jnp.asarray(rewards, jnp.float32), group_size)
    return jnp.sum(jnp.all(r == r[:, :1], axis=1).astype(jnp.float32))


def combine_advantages(rewards: Mapping[str, jax.Array], coefs: Mapping[str, float], group_size: int,
                       eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """Multi-reward GRPO: one advantage per reward, each normalised separately.

    Returns ``(advantages (R, B), coefs (R,))`` in the order of ``rewards``' keys. The losses are
    summed with the coefficients (pass both to ``policy_loss(..., reward_coefs=coefs)``) rather
    than the advantages summed, because the clipped surrogate is not additive across rewards."""
    names = list(rewards)
    if not names:
        raise ConfigError("combine_advantages needs at least one reward")
    missing = [n for n in names if n not in coefs]
    if missing:
        raise ConfigError(f"no coefficient for reward(s) {missing}; coefs has {sorted(coefs)}")
    adv = jnp.stack([group_advantages(rewards[n], group_size, eps) for n in names])
    return adv, jnp.asarray([float(coefs[n]) for n in names], jnp.float32)


def pixel_rewards_to_advantages(rewards: jax.Array, maps: jax.Array, group_size: int,
                                eps: float = 1e-8, stats: str = "position") -> jax.Array:
    """The ablation "map applied to the reward": ``r_i(p) = M_i(p)*r_i``, then group-normalised.

    ``rewards`` (B,), ``maps`` (B, *P) -> advantages (B, *P) (the loss then clamps them to ±5 and
    does not apply the map again). ``stats='position'`` (default) normalises each position over the
    G samples of its group: the GRPO formula applied to a per-pixel reward, which is what the paper's
    argument about mismatched locations refers to. ``stats='group'`` uses one mean/std over all
    positions and samples of the group, as the official Wan code's reward-map branch does (that
    code then multiplies by the map a second time; we do not)."""
    r = jnp.asarray(rewards, jnp.float32)
    m = jnp.asarray(maps, jnp.float32)
    pix = m * r.reshape(r.shape + (1,) * (m.ndim - 1))
    g = _grouped(pix, group_size)
    if stats == "position":
        return _normalise(g, (1,), eps).reshape(pix.shape)
    if stats == "group":  # centred on the group's first sample at its first position
        axes = tuple(range(1, g.ndim))
        first = g.reshape(g.shape[0], -1)[:, :1].reshape((g.shape[0],) + (1,) * (g.ndim - 1))
        d = g - first
        mean = jnp.mean(d, axis=axes, keepdims=True)
        std = jnp.std(d, axis=axes, keepdims=True, ddof=1)
        return jnp.where(std == 0, 0.0, (d - mean) / (std + eps)).reshape(pix.shape)
    raise ConfigError(f"stats must be 'position' or 'group', got {stats!r}")
