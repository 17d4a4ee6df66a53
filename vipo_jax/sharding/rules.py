"""Logical axis names -> mesh axes (docs/PORTING.md, "Logical axis names").

Parameters carry logical names as ``out_sharding`` metadata; activations name their dimensions
at :func:`constrain`. One rule table maps both to the mesh, so changing how a model is split is a
config change (``--config.sharding.rules="embed=,mlp=fsdp"``), never a model edit.

A mesh axis that does not divide a dimension is dropped for that dimension (with one warning per
case) instead of failing: small toy models and odd channel counts still run on any mesh. A mesh
axis is never used twice in one spec.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from vipo_jax.errors import ConfigError
from vipo_jax.sharding.mesh import MESH_AXES

log = logging.getLogger(__name__)

Rules = Mapping[str, tuple[str, ...]]
"""logical name -> mesh axes (empty: replicated), in the order they split the dimension."""

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def _axes(name: str, value: Any) -> tuple[str, ...]:
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        value = tuple(a for a in value.replace("+", " ").split() if a)
    if not isinstance(value, (tuple, list)) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"sharding rule for {name!r}: mesh axes must be None, a name or a sequence of "
                          f"names, got {value!r}")
    for a in value:
        if a not in MESH_AXES:
            raise ConfigError(f"sharding rule {name}={'+'.join(value)}: unknown mesh axis {a!r}; the mesh axes "
                              f"are {', '.join(MESH_AXES)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"sharding rule {name}={'+'.join(value)} names a mesh axis twice")
    return tuple(value)


def _pairs(spec: Any) -> list[tuple[str, Any]]:
    if isinstance(spec, str):
        out = []
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise ConfigError(f"--config.sharding.rules: {item!r} is not 'logical=axis[+axis]' "
                                  "(e.g. 'embed=fsdp,batch=data+fsdp,layers=')")
            k, v = item.split("=", 1)
            out.append((k.strip(), v.strip()))
        return out
    if isinstance(spec, Mapping):
        return list(spec.items())
    try:
        pairs = [tuple(p) for p in spec]
    except TypeError:
        raise ConfigError(f"sharding rules must be a string, a mapping or (logical, axes) pairs, "
                          f"got {spec!r}") from None
    for p in pairs:
        if len(p) != 2:
            raise ConfigError(f"sharding rule {p!r} is not a (logical, mesh axes) pair")
    return pairs


def make_rules(overrides: Any = None, base: Any = DEFAULT_RULES) -> dict[str, tuple[str, ...]]:
    """Rules = ``base`` with ``overrides`` on top. Both may be a string
    ``"embed=fsdp,batch=data+fsdp,layers="`` (empty right side: replicated), a mapping, or
    ``(logical, axes)`` pairs with axes ``None``, a mesh axis or a sequence of mesh axes."""
    rules: dict[str, tuple[str, ...]] = {}
    for spec in (base, overrides):
        if spec is None:
            continue
        for name, value in _pairs(spec):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"sharding rule names must be non-empty strings, got {name!r}")
            rules[name] = _axes(name, value)
    return rules


def rules_from_config(c: Any) -> dict[str, tuple[str, ...]]:
    """The rules of a run config: defaults plus ``config.sharding.rules`` (if the section exists)."""
    section = c.get("sharding") if hasattr(c, "get") else None
    return make_rules(section.get("rules") if section is not None else None)


# --- names -> PartitionSpec -----------------------------------------------------------------------
_warned: set[tuple] = set()


def _warn_once(key: tuple, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _mesh_axes(mesh: Any) -> dict[str, int]:
    """Usable axis sizes of a Mesh or AbstractMesh (Manual axes, inside shard_map, excluded)."""
    types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
    return {a: int(s) for a, s, t in zip(mesh.axis_names, mesh.axis_sizes, types) if t != AxisType.Manual}


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Any,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for a value whose dimensions have logical ``names`` (``None``: never split).

    Mesh axes of size 1, axes already used by an earlier dimension, and (given ``shape``) axes that
    do not divide the dimension are left out, so the spec is always valid for ``mesh``."""
    if not names:
        return PartitionSpec()
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match a value of shape {tuple(shape)}")
    sizes = _mesh_axes(mesh)
    used: set[str] = set()
    out: list[Any] = []
    for d, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"no sharding rule for the logical axis name {name!r} (known: {', '.join(rules)}); "
                              f"add one, e.g. --config.sharding.rules='{name}=fsdp' (or '{name}=' to replicate)")
        kept: list[str] = []
        for axis in rules[name]:
            size = sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if shape is not None and shape[d] % (int(np.prod([sizes[a] for a in kept])) * size):
                _warn_once((name, int(shape[d]), axis, size),
                           f"sharding: dimension {d} ({name!r}, size {shape[d]}) of a {tuple(shape)} value is not "
                           f"divisible by mesh axis {axis!r} (size {size}); not split over it")
                continue
            kept.append(axis)
            used.add(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named_sharding(names: Sequence[str | None] | None, rules: Rules, mesh: jax.sharding.Mesh,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


# --- parameters ------------------------------------------------------------------------------------
def _variable_names(var: nnx.Variable) -> tuple | None:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def param_shardings(tree: Any, rules: Rules, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for every leaf of ``tree`` (a module, its ``nnx.State``, or any pytree of
    states and arrays, e.g. the train state with its optimizer state), with the same structure as
    the state so it can be given to ``jax.jit(in_shardings=...)`` and ``jax.device_put``.

    ``nnx.Variable`` leaves are split by their ``out_sharding`` names; everything else (step
    counters, RNG keys, unannotated parameters) is replicated. Works on abstract values."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)

    def one(path, x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            shape = tuple(np.shape(value))
            names = _variable_names(x)
            if names is not None and len(names) != len(shape):
                raise ValueError(f"{jax.tree_util.keystr(path)}: logical names {names} do not match its shape {shape}")
            return x.replace(named_sharding(names, rules, mesh, shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class LogicalSharding:
    """A ``load_into(..., sharding=...)`` function that places each parameter by its logical names.

    ``load_into`` calls :meth:`bind` with the abstract model it fills (the loaders build it
    themselves), so ``flux.from_pretrained(path, sharding=LogicalSharding(rules, mesh))`` loads
    every leaf straight into its shard. Called as ``fn(dotted_name, ShapeDtypeStruct)``."""

    def __init__(self, rules: Rules, mesh: jax.sharding.Mesh, names: Mapping[str, tuple | None] | None = None):
        self.rules, self.mesh, self.names = rules, mesh, names

    def bind(self, abstract_model: nnx.Module) -> LogicalSharding:
        names = {".".join(str(p) for p in path): _variable_names(var)
                 for path, var in nnx.to_flat_state(nnx.state(abstract_model))}
        return LogicalSharding(self.rules, self.mesh, names)

    def __call__(self, name: str, abstract: jax.ShapeDtypeStruct) -> NamedSharding:
        if self.names is None:
            raise ValueError("LogicalSharding must be bound to the abstract model first (load_into does this)")
        return named_sharding(self.names.get(name), self.rules, self.mesh, abstract.shape)


# --- activations -----------------------------------------------------------------------------------
_ACTIVE: list[Rules] = [make_rules()]


def current_rules() -> Rules:
    return _ACTIVE[-1]


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[Rules]:
    """Rules that :func:`constrain` applies while tracing inside this block."""
    _ACTIVE.append(rules)
    try:
        yield rules
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[jax.sharding.Mesh]:
    """``jax.set_mesh(mesh)`` and :func:`use_rules` together: trace and run sharded steps in here."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names through the active rules.

    Identity when no mesh is set (``jax.set_mesh``), so models still run unsharded, and when the
    names split nothing on this mesh (GSPMD then decides alone)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, current_rules(), mesh, x.shape)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_batch(tree: Any) -> Any:
    """Constrain every array of ``tree`` on its leading (batch) axis only."""
    return jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)) if a.ndim else a, tree)
