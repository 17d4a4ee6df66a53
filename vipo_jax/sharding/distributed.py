"""Multi-host start-up and moving host data onto the global mesh.

Launch contract (``python -m vipo_jax.train --distributed``): ``jax.distributed.initialize()`` gets
its coordinator address, process count and process id from ``VIPO_COORDINATOR`` (host:port),
``VIPO_NUM_PROCESSES`` and ``VIPO_PROCESS_ID`` where they are set, and auto-detects the rest
(TPU pods, SLURM, Open MPI). Every process runs the same program; each reads its own slice of the
prompts and the global batch is assembled from those slices without any host-to-host copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vipo_jax.errors import ConfigError
from vipo_jax.sharding.rules import Rules, named_sharding

ENV_COORDINATOR = "VIPO_COORDINATOR"
ENV_NUM_PROCESSES = "VIPO_NUM_PROCESSES"
ENV_PROCESS_ID = "VIPO_PROCESS_ID"


def distributed_args(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``jax.distributed.initialize`` arguments set by the ``VIPO_*`` variables (others: auto)."""
    env = os.environ if env is None else env
    args: dict[str, Any] = {}
    coord = env.get(ENV_COORDINATOR, "").strip()
    if coord:
        host, _, port = coord.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{ENV_COORDINATOR}={coord!r} must be host:port (e.g. 10.0.0.1:8476)")
        args["coordinator_address"] = coord
    for var, key, lo in ((ENV_NUM_PROCESSES, "num_processes", 1), (ENV_PROCESS_ID, "process_id", 0)):
        raw = env.get(var, "").strip()
        if raw:
            try:
                v = int(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} must be an integer") from None
            if v < lo:
                raise ConfigError(f"{var}={v} must be >= {lo}")
            args[key] = v
    n, i = args.get("num_processes"), args.get("process_id")
    if n is not None and i is not None and i >= n:
        raise ConfigError(f"{ENV_PROCESS_ID}={i} must be < {ENV_NUM_PROCESSES}={n}")
    return args


def initialize_distributed(env: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """``jax.distributed.initialize`` from the ``VIPO_*`` variables; call before any other JAX use.
    ``extra``: further ``initialize`` arguments (e.g. ``shutdown_timeout_seconds`` where processes
    may finish minutes apart). Returns the arguments it passed (a second call is a no-op)."""
    args = {**distributed_args(env), **extra}
    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**args)
        except ValueError as e:  # nothing to auto-detect
            raise ConfigError(
                f"--distributed: {e}. Outside a TPU pod or a SLURM job, set {ENV_COORDINATOR}=host:port, "
                f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} for every process.") from e
    return args


def is_main_process() -> bool:
    """Process 0 writes logs, plots, PNG grids and summaries; all processes run the steps."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (e.g. a SIGTERM seen by one host)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


# --- host data -> global arrays --------------------------------------------------------------------
def to_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place a host value that is the same on every process (weights, eval noise, RNG keys) with
    ``sharding``; each process transfers only the slices its own devices hold."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a reshard
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
    """:func:`to_global` over a tree and its matching tree of shardings."""
    return jax.tree.map(to_global, tree, shardings)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(global_shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """Leading axis ``"batch"`` (``data x fsdp`` by default), the rest replicated."""
    return named_sharding(("batch",) + (None,) * (len(global_shape) - 1), rules, mesh, global_shape)


def _rows_match_process(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], local_rows: int) -> bool:
    """Do this process's devices hold exactly rows ``[p * local_rows, (p + 1) * local_rows)``?"""
    p = jax.process_index()
    rows = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*idx[0].indices(global_shape[0])))
    return rows == set(range(p * local_rows, (p + 1) * local_rows))


def global_batch(local: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """Global arrays (leading axis ``process_count x`` longer) from each process's own rows.

    Process ``p`` passes rows ``[p * n, (p + 1) * n)`` of the global batch (the slice the prompt
    loader gives it). Where the batch sharding keeps those rows on the process's own devices this is
    ``jax.make_array_from_process_local_data``; otherwise (e.g. fewer prompts than data x fsdp, so
    the batch is replicated) the rows are first gathered from all processes."""
    nproc = jax.process_count()

    def one(x):
        x = np.asarray(x)
        shape = (x.shape[0] * nproc,) + x.shape[1:]
        sharding = batch_sharding(shape, mesh, rules)
        if nproc == 1:
            return jax.device_put(x, sharding)
        if _rows_match_process(sharding, shape, x.shape[0]):
            return jax.make_array_from_process_local_data(sharding, x, shape)
        from jax.experimental import multihost_utils

        full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.make_array_from_callback(shape, sharding, lambda idx: full[idx])

    return jax.tree.map(one, local)


def fetch(x: Any) -> Any:
    """Host numpy copy of (possibly global) arrays, the same on every process."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if a.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)
