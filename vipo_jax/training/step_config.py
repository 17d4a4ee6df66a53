"""The train step's settings as one validated value: sampling (steps, shift, noise), which
transitions are trained, the clipped objective's switches, the PSM's options and the rewards.

``StepConfig.from_config(c)`` reads them from a run config; every check names the option as it is
spelled on the command line (``--config.sampling.num_steps``) and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections as mlc

from vipo_jax import rl
from vipo_jax.errors import ConfigError
from vipo_jax.rewards import reward_weights

#: StepConfig field -> its config key, for messages.
KEYS = {
    "num_steps": "sampling.num_steps", "shift": "sampling.shift", "eta": "sampling.eta",
    "group_size": "sampling.group_size", "timestep_fraction": "train.timestep_fraction",
    "num_updates": "train.num_updates", "micro_batch": "train.micro_batch", "clip_range": "train.clip_range",
    "adv_clip_max": "train.adv_clip_max", "logprob_reduction": "train.logprob_reduction",
    "map_target": "train.map_target", "init_same_noise": "sampling.init_same_noise",
    "sde_window": "sampling.sde_window", "window_schedule": "sampling.window_schedule",
    "window_stride": "sampling.window_stride", "window_every": "sampling.window_every",
    "ode_solver": "sampling.ode_solver", "window_fraction": "train.window_fraction",
    "ratio_norm": "train.ratio_norm", "ratio_norm_reweight": "train.ratio_norm_reweight",
    "stochastic_last_step": "sampling.stochastic_last_step",
}
#: ``train.map_target``: the map on the advantage (the method), on the reward (the paper's ablation),
#: or on both (the official Wan + HPS path: the reward map's group statistics, then the map again).
MAP_TARGETS = ("advantage", "reward", "reward_and_advantage")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """``psm``: the PSM's options, or ``None`` for plain GRPO (every position weighted 1, the
    DanceGRPO baseline). ``rewards``: ``((name, coefficient), ...)``, one advantage each.

    Faster sampling (MixGRPO, docs/METHOD.md §1): ``sde_window`` > 0 samples with the SDE only in
    a window of that many transitions (``window_schedule`` sliding by ``window_stride`` every
    ``window_every`` iterations, or random) and trains ``window_fraction`` of the window's
    transitions; ``ode_solver`` (euler | dpm2 | ab2) takes the steps outside it. ``ratio_norm``:
    GRPO-Guard's normalisation of each transition's log-ratio (``ratio_norm_reweight``: its 1/dt
    loss weights, normalised to mean 1 over the trainable transitions)."""

    num_steps: int
    shift: float
    eta: float
    group_size: int
    timestep_fraction: float = 0.6
    num_updates: int = 1
    micro_batch: int = 0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    logprob_reduction: str = "position_sum"
    map_target: str = "advantage"
    psm: rl.PSMOptions | None = dataclasses.field(default_factory=rl.PSMOptions)
    init_same_noise: bool = True
    rewards: tuple[tuple[str, float], ...] = (("reward", 1.0),)
    sde_window: int = 0
    window_schedule: str = "sliding"
    window_stride: int = 1
    window_every: int = 25
    ode_solver: str = "euler"
    window_fraction: float = 1.0
    ratio_norm: bool = False
    ratio_norm_reweight: bool = True
    stochastic_last_step: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"--config.{KEYS[field]}={getattr(self, field)!r} {why}")

        if int(self.num_steps) < 2:
            raise bad("num_steps", "must be >= 2 (the last step is never trained)")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise bad("shift", "must be a finite number > 0")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise bad("eta", "must be > 0: with eta=0 the sampler is deterministic and has no log-probability "
                             "to train")
        if int(self.group_size) < 2:
            raise bad("group_size", "must be >= 2: GRPO needs at least 2 generations per prompt for a "
                                    "group-relative advantage")
        if not 0 < self.timestep_fraction <= 1:
            raise bad("timestep_fraction", "must be in (0, 1]")
        if self.num_train_timesteps < 1:
            raise ConfigError(f"--config.train.timestep_fraction={self.timestep_fraction} x (num_steps-1="
                              f"{self.num_steps - 1}) trains no timestep: raise one of them")
        if int(self.num_updates) < 1:
            raise bad("num_updates", "must be >= 1")
        if int(self.micro_batch) < 0:
            raise bad("micro_batch", "must be >= 0 (0: all samples of an update at once)")
        for f in ("clip_range", "adv_clip_max"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v > 0):
                raise bad(f, "must be a finite number > 0")
        if self.logprob_reduction not in rl.LOGPROB_REDUCTIONS:
            raise bad("logprob_reduction", f"is not one of {', '.join(rl.LOGPROB_REDUCTIONS)}")
        if self.map_target not in MAP_TARGETS:
            raise bad("map_target", f"is not one of {', '.join(MAP_TARGETS)}")
        if not self.rewards:
            raise ConfigError("--config.rewards.names is empty: name at least one reward")
        if not 0 <= int(self.sde_window) <= self.num_steps - 1:
            raise bad("sde_window", f"must be in 0..{self.num_steps - 1} (0: the SDE on every trainable step)")
        if self.window_schedule not in rl.WINDOW_SCHEDULES:
            raise bad("window_schedule", f"is not one of {', '.join(rl.WINDOW_SCHEDULES)}")
        if int(self.window_stride) < 0 or int(self.window_every) < 1:
            raise ConfigError("--config.sampling.window_stride must be >= 0 and window_every >= 1")
        if self.ode_solver not in rl.ODE_SOLVERS:
            raise bad("ode_solver", f"is not one of {', '.join(rl.ODE_SOLVERS)}")
        if not 0 < self.window_fraction <= 1:
            raise bad("window_fraction", "must be in (0, 1]")
        if self.stochastic_last_step and (self.windowed or self.ode_solver != "euler" or self.ratio_norm):
            raise ConfigError("--config.sampling.stochastic_last_step (the official scripts' sampling) cannot be "
                              "combined with sampling.sde_window, sampling.ode_solver or train.ratio_norm")
        if self.windowed and int(self.sde_window * self.window_fraction) < 1:
            raise ConfigError(f"--config.train.window_fraction={self.window_fraction} of a {self.sde_window}-step "
                              "window trains no transition: raise one of them")

    @property
    def loss_map_target(self) -> str:
        """What the loss does with the map: apply it (``advantage``) or nothing (the advantages
        already hold it)."""
        return "advantage" if self.map_target == "advantage" else "reward"

    @property
    def windowed(self) -> bool:
        """Whether the SDE runs only inside a window (MixGRPO)."""
        return int(self.sde_window) > 0

    @property
    def num_train_timesteps(self) -> int:
        if self.windowed:
            return int(self.sde_window * self.window_fraction)
        return int((self.num_steps - 1) * self.timestep_fraction)

    @property
    def psm_enabled(self) -> bool:
        return self.psm is not None

    def check_batch(self, num_prompts: int) -> None:
        """That an iteration of ``num_prompts`` prompts splits into the configured updates and
        micro-batches."""
        batch = int(num_prompts) * int(self.group_size)
        if batch % self.num_updates:
            raise ConfigError(f"--config.train.num_updates={self.num_updates} must divide the iteration's {batch} "
                              "samples (prompts_per_iter x group_size)")
        chunk = batch // self.num_updates
        if self.psm is not None and self.psm.control == "shuffled" and int(num_prompts) < 2:
            raise ConfigError("--config.psm.control='shuffled' gives each sample another group's map: it needs "
                              "--config.sampling.prompts_per_iter >= 2")
        if self.micro_batch and chunk % self.micro_batch:
            raise ConfigError(f"--config.train.micro_batch={self.micro_batch} must divide the {chunk} samples of "
                              "one update")

    @classmethod
    def from_config(cls, c: mlc.ConfigDict) -> StepConfig:
        s, t, p = c.sampling, c.train, c.psm
        if int(s.prompts_per_iter) < 1:
            raise ConfigError(f"--config.sampling.prompts_per_iter={s.prompts_per_iter} must be >= 1")
        psm = None
        if bool(p.enabled):
            psm = psm_options(p)
        cfg = cls(num_steps=int(s.num_steps), shift=float(s.shift), eta=float(s.eta), group_size=int(s.group_size),
                  timestep_fraction=float(t.timestep_fraction), num_updates=int(t.num_updates),
                  micro_batch=int(t.micro_batch), clip_range=float(t.clip_range), adv_clip_max=float(t.adv_clip_max),
                  logprob_reduction=str(t.logprob_reduction), map_target=str(t.map_target), psm=psm,
                  init_same_noise=bool(s.init_same_noise), rewards=reward_weights(c),
                  sde_window=int(s.get("sde_window", 0)), window_schedule=str(s.get("window_schedule", "sliding")),
                  window_stride=int(s.get("window_stride", 1)), window_every=int(s.get("window_every", 25)),
                  ode_solver=str(s.get("ode_solver", "euler")), window_fraction=float(t.get("window_fraction", 1.0)),
                  ratio_norm=bool(t.get("ratio_norm", False)),
                  ratio_norm_reweight=bool(t.get("ratio_norm_reweight", True)),
                  stochastic_last_step=bool(s.get("stochastic_last_step", False)))
        cfg.check_batch(int(s.prompts_per_iter))
        return cfg


def psm_options(p: mlc.ConfigDict) -> rl.PSMOptions:
    """``config.psm`` as :class:`~vipo_jax.rl.PSMOptions`, its errors naming the option."""
    k = p.num_components
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ConfigError(f"--config.psm.num_components={k!r} must be an integer in 1..16")
    for name, choices in (("sign_rule", rl.SIGN_RULES), ("aggregation", rl.AGGREGATIONS),
                          ("control", rl.CONTROLS)):
        if p.get(name, "none") not in choices:
            raise ConfigError(f"--config.psm.{name}={p.get(name)!r} is not one of {', '.join(choices)}")
    if not (math.isfinite(p.smooth_sigma) and p.smooth_sigma >= 0):
        raise ConfigError(f"--config.psm.smooth_sigma={p.smooth_sigma} must be >= 0 (0: no smoothing)")
    return rl.PSMOptions.from_any(p)
