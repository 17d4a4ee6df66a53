"""One device mesh for the whole run, with axes ``data, fsdp, context, tensor`` (docs/ARCHITECTURE.md, "Sharding").

The sizes come from the config's ``mesh`` section; one of them may be ``-1`` (all the devices the
others leave). Every axis is ``AxisType.Auto``: the models are written for GSPMD propagation plus
``with_sharding_constraint`` at a few points (:func:`vipo_jax.sharding.constrain`); explicit axes
would make every reshape and einsum of a sharded array name its output sharding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from vipo_jax.errors import ConfigError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor")


def _sizes_from_config(cfg: Any) -> dict[str, int]:
    if cfg is None:
        return {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}
    given = {k: cfg[k] for k in cfg.keys()}  # a dict or the config's ConfigDict
    unknown = set(given) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"--config.mesh has unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {}
    for axis in MESH_AXES:
        v = given.get(axis, 1)
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"--config.mesh.{axis}={v!r} must be a positive integer or -1 (the remaining devices)")
        sizes[axis] = v
    return sizes


def mesh_shape(cfg: Any, num_devices: int) -> dict[str, int]:
    """Axis sizes for ``num_devices`` devices, with the (at most one) ``-1`` axis filled in."""
    sizes = _sizes_from_config(cfg)
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ConfigError(f"--config.mesh: only one axis may be -1, got {', '.join(rest)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    shown = " x ".join(f"{a}={v}" for a, v in sizes.items())
    if rest:
        if num_devices % fixed:
            raise ConfigError(f"--config.mesh ({shown}): the fixed axes need a multiple of {fixed} devices, "
                              f"but there are {num_devices}")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"--config.mesh ({shown}) has {fixed} devices, but there are {num_devices}; "
                          "make the product match, or set one axis to -1")
    return sizes


def make_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's mesh from ``cfg`` (the config's ``mesh`` section, or a dict) over ``devices``
    (default: every device of every process). ``None``: all devices on ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A mesh of one device (all axes of size 1): sharded code runs unchanged on it."""
    return make_mesh({}, devices=[device or jax.devices()[0]])
