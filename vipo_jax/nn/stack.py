"""Stacked, scanned layers: N identical blocks stored with a leading layer axis and run with
``jax.lax.scan``, so compile time does not grow with depth. Remat policies are chosen by name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all_dots": jax.checkpoint_policies.checkpoint_dots,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


_UNROLL_ALL = False


@contextlib.contextmanager
def unrolled_stacks() -> Iterator[None]:
    """Trace every :func:`scan_stack` fully unrolled: XLA's cost analysis counts a loop body once,
    so FLOP counting (``vipo_jax.plan``) traces the layers without the loop."""
    global _UNROLL_ALL
    old, _UNROLL_ALL = _UNROLL_ALL, True
    try:
        yield
    finally:
        _UNROLL_ALL = old


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def make_stack(factory: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build ``num`` blocks with independent initialisations, stacked along axis 0 of every leaf (whose
    logical sharding names, where a parameter has them, gain a leading ``"layers"``)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs):
        return factory(r)

    return create(rngs)


def scan_stack(stack: nnx.Module, carry: Any, *args: Any, remat: str = "none",
               unroll: int = 1) -> Any:
    """Run ``carry = block(carry, *args)`` for each block of a stack made by :func:`make_stack`.

    ``args`` are broadcast to every block. Blocks must be pure (no state updates)."""
    graphdef, params = nnx.split(stack)

    def body(c, layer_params):
        block = nnx.merge(graphdef, layer_params)
        return block(c, *args), None

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, params, unroll=True if _UNROLL_ALL else unroll)
    return carry
