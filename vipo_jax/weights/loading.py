"""Strict loading of converted weights straight into an abstract (``nnx.eval_shape``) model.

A converter turns a checkpoint's tensors into ``{"dotted.nnx.path": array}`` through
:class:`SourceKeys`, which records which source keys were consumed, so that a missing key, an
unexpected key or a shape mismatch is an error that names the key and both shapes. Nothing is
ever initialised randomly: every parameter of the model must come from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError

ShardingFn = Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding | None]


class SourceKeys:
    """The tensors of one checkpoint, with bookkeeping of which keys a converter consumed."""

    def __init__(self, tensors: Mapping[str, np.ndarray], where: str = "checkpoint"):
        self.tensors = tensors
        self.where = where
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self.tensors, "shape"):
            return tuple(self.tensors.shape(key))
        return tuple(np.shape(self.tensors[key]))

    def take(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise CheckpointError(f"missing key {key!r} in {self.where}")
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def stack(self, keys: Iterable[str], fn: Callable[[np.ndarray], np.ndarray] | None = None):
        keys = list(keys)
        arrays = [self.take(k) for k in keys]
        for k, a in zip(keys[1:], arrays[1:]):
            if a.shape != arrays[0].shape:
                raise CheckpointError(f"shape mismatch in {self.where}: {k!r} has shape {a.shape} but "
                                      f"{keys[0]!r} has {arrays[0].shape} (layers must match)")
        if fn is not None:
            arrays = [fn(a) for a in arrays]
        return np.stack(arrays)

    def unused(self, ignore: Callable[[str], bool] | None = None) -> list[str]:
        rest = [k for k in self.tensors if k not in self.used]
        return sorted(k for k in rest if not (ignore and ignore(k)))

    def check_all_used(self, ignore: Callable[[str], bool] | None = None) -> None:
        rest = self.unused(ignore)
        if rest:
            more = f" (and {len(rest) - 8} more)" if len(rest) > 8 else ""
            raise CheckpointError(
                f"unexpected keys in {self.where}: {rest[:8]}{more}. The checkpoint does not match "
                "the model config (wrong config.json, or a different model variant)."
            )


# Layout transforms from PyTorch to Flax conventions.
def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax kernel (in, out)."""
    return np.asarray(w).T


def conv(w: np.ndarray) -> np.ndarray:
    """torch ConvNd (O, I, *k) -> flax (*k, I, O)."""
    w = np.asarray(w)
    return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def abstract_params(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted path -> ShapeDtypeStruct of every parameter-like variable of ``model``."""
    _, state = nnx.split(model)
    out = {}
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        out[".".join(str(p) for p in path)] = jax.ShapeDtypeStruct(np.shape(v), v.dtype)
    return out


def abstract_model(model_cls: Any, cfg: Any) -> nnx.Module:
    """``nnx.eval_shape`` of ``model_cls(cfg)`` outside any mesh: under one (``jax.set_mesh``), flax
    would read the parameters' logical axis names as mesh axes. Placement is :func:`load_into`'s job."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def init_model(model_cls: Any, cfg: Any, *, abstract: bool, seed: int = 0) -> nnx.Module:
    """``model_cls(cfg)`` without a checkpoint: its shapes only (``abstract``, for planning memory and
    FLOPs) or random weights (``seed``; for timing and memory benchmarks). Built outside any mesh,
    like :func:`abstract_model`."""
    if abstract:
        return abstract_model(model_cls, cfg)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return model_cls(cfg, rngs=nnx.Rngs(seed))


def load_into(abstract_model: nnx.Module, params: Mapping[str, Any], *, where: str = "checkpoint",
              sharding: ShardingFn | None = None) -> nnx.Module:
    """Fill an abstract model with ``params``; each leaf is cast to the model's dtype and placed
    directly with its target sharding (no replicated full copy is made). A ``sharding`` with a
    ``bind(abstract_model)`` method (``vipo_jax.sharding.LogicalSharding``) is bound to this model
    first, so it can read the parameters' logical axis names."""
    if sharding is not None and hasattr(sharding, "bind"):
        sharding = sharding.bind(abstract_model)
    graphdef, state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(state))
    want = {".".join(str(p) for p in path) for path, _ in flat}
    missing = sorted(want - set(params))
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{where} is missing weights for {missing[:8]}{more}")
    extra = sorted(set(params) - want)
    if extra:
        raise CheckpointError(f"converter for {where} produced unknown parameters {extra[:8]}")
    leaves = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        abstract = var.get_value()
        value = params[name]
        if tuple(np.shape(value)) != tuple(abstract.shape):
            raise CheckpointError(
                f"shape mismatch for {name} from {where}: checkpoint has {tuple(np.shape(value))}, "
                f"model expects {tuple(abstract.shape)}"
            )
        if not jnp.issubdtype(abstract.dtype, jnp.floating):
            raise CheckpointError(f"{name}: cannot load weights into non-float dtype {abstract.dtype}")
        value = np.asarray(value)
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V"
                or "bfloat16" in str(value.dtype) or "float8" in str(value.dtype)):
            raise CheckpointError(f"{name} in {where} has non-float dtype {value.dtype}")
        value = value.astype(abstract.dtype)
        target = sharding(name, jax.ShapeDtypeStruct(abstract.shape, abstract.dtype)) if sharding else None
        if target is None:
            arr = jnp.asarray(value)
        elif target.is_fully_addressable:
            arr = jax.device_put(value, target)
        else:  # multi-host: each process transfers only its own devices' slices
            arr = jax.make_array_from_callback(value.shape, target, lambda idx, v=value: v[idx])
        leaves.append((path, var.replace(value=arr)))
    new_state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, new_state)


def check_float_dtype(dtype: Any, what: str) -> jnp.dtype:
    """Validate a user-requested parameter/compute dtype (e.g. ``"bfloat16"``)."""
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise CheckpointError(f"{what}: unknown dtype {dtype!r}") from e
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise CheckpointError(f"{what}: dtype must be float32, bfloat16 or float16, got {d}")
    return d


def dtype_overrides(overrides: Mapping[str, Any], param_dtype: Any = None, dtype: Any = None, *,
                    what: str = "") -> dict[str, Any]:
    """A loader's config ``overrides`` with its ``param_dtype`` / ``dtype`` arguments, validated
    (None: keep the config's)."""
    out = dict(overrides)
    prefix = f"{what} " if what else ""
    if param_dtype is not None:
        out["param_dtype"] = str(check_float_dtype(param_dtype, f"{prefix}param_dtype"))
    if dtype is not None:
        out["dtype"] = str(check_float_dtype(dtype, f"{prefix}dtype"))
    return out
