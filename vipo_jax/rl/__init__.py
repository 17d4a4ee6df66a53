"""The RL core of ViPO as pure, jittable JAX functions (no model code: models are callables).

``schedule``: sigma grid. ``sde``: the flow SDE step and its Gaussian log-prob. ``rollout``: the
sampler as one ``lax.scan``. ``logprob``: reducing log-probs, recomputing them in training.
``timesteps``: the RNG helpers (shared group noise, trained-timestep subsets). ``windows``: the SDE
in a window of steps, ODE solvers outside it (MixGRPO). ``ratio_norm``: GRPO-Guard's RatioNorm.
``branch``: tree rollouts with depth-wise advantages (BranchGRPO).
``advantages``: group-relative advantages. ``psm``: the Perceptual Structuring Module (allocation
map). ``loss``: the per-position clipped surrogate.
"""

from vipo_jax.rl.advantages import (
    combine_advantages,
    degenerate_groups,
    group_advantages,
    pixel_rewards_to_advantages,
)
from vipo_jax.rl.logprob import LOGPROB_REDUCTIONS, reduce_logprob, step_logprob
from vipo_jax.rl.loss import MAP_TARGETS, clipped_surrogate, pixel_advantages, policy_loss
from vipo_jax.rl.psm import (
    AGGREGATIONS,
    CONTROLS,
    SIGN_RULES,
    PSMOptions,
    antialias_resize_matrix,
    control_map,
    gaussian_filter_matrix,
    gaussian_smooth_2d,
    linear_resize_matrix,
    map_stats,
    psm_map,
    psm_map_video,
    resize_bilinear_antialias,
)
from vipo_jax.rl.ratio_norm import guard_transition, mean_step_weight, ratio_norm_elementwise, step_weight
from vipo_jax.rl.rollout import rollout
from vipo_jax.rl.schedule import sigma_schedule
from vipo_jax.rl.sde import (
    ode_step,
    sde_logprob,
    sde_mean_std,
    sde_step,
    transition_logprob,
    x0_prediction,
)
from vipo_jax.rl.timesteps import gather_transitions, initial_noise, num_train_timesteps, sample_train_timesteps
from vipo_jax.rl.windows import (
    ODE_SOLVERS,
    WINDOW_SCHEDULES,
    rollout_windowed,
    sde_mask,
    trained_sde_fraction,
    window_metrics,
    window_start,
    window_train_timesteps,
)

__all__ = [
    "AGGREGATIONS", "CONTROLS", "LOGPROB_REDUCTIONS", "MAP_TARGETS", "ODE_SOLVERS", "SIGN_RULES",
    "WINDOW_SCHEDULES", "PSMOptions", "guard_transition", "mean_step_weight", "ratio_norm_elementwise",
    "rollout_windowed", "sde_mask", "step_weight", "trained_sde_fraction", "window_metrics", "window_start",
    "window_train_timesteps",
    "antialias_resize_matrix", "clipped_surrogate", "combine_advantages", "control_map", "gather_transitions",
    "degenerate_groups", "gaussian_filter_matrix", "gaussian_smooth_2d", "group_advantages", "initial_noise",
    "linear_resize_matrix", "map_stats", "num_train_timesteps", "ode_step", "pixel_advantages",
    "pixel_rewards_to_advantages", "policy_loss", "psm_map", "psm_map_video", "reduce_logprob",
    "resize_bilinear_antialias", "rollout", "sample_train_timesteps", "sde_logprob", "sde_mean_std",
    "sde_step", "sigma_schedule", "step_logprob", "transition_logprob", "x0_prediction",
]
