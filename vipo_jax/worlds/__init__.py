"""Model-specific wiring of the training loop: the toy and real Flux (and later Wan) worlds."""

from __future__ import annotations

from typing import Any


def build_world(c) -> Any:
    if c.model.family == "flux":
        from vipo_jax.worlds.flux import build_flux_world

        return build_flux_world(c)
    from vipo_jax.errors import ConfigError

    raise ConfigError(f"--config.model.family={c.model.family!r}: only 'flux' is available")
