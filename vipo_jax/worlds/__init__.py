"""Model-specific wiring of the training loop: the toy and real Flux and Wan worlds."""

from __future__ import annotations

from typing import Any


def build_world(c, sharding: Any = None) -> Any:
    """The world of ``c.model.family``. ``sharding`` (a ``load_into`` sharding function such as
    ``vipo_jax.sharding.LogicalSharding(rules, mesh)``) places big checkpoints as they load."""
    if c.model.family == "flux":
        from vipo_jax.worlds.flux import build_flux_world

        return build_flux_world(c, sharding=sharding)
    if c.model.family == "wan":
        from vipo_jax.worlds.wan import build_wan_world

        return build_wan_world(c, sharding=sharding)
    from vipo_jax.errors import ConfigError

    raise ConfigError(f"--config.model.family={c.model.family!r}: use 'flux' or 'wan'")
