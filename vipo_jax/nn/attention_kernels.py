"""Attention kernels for scale-out, registered by name in :mod:`vipo_jax.nn.attention`.

* ``"splash"``: jax's Pallas TPU splash (flash) attention. It never materialises the (Lq, Lk)
  logits, which is what makes 4k-token FLUX and long Wan sequences fit. Its grid works in blocks
  of 128 tokens, so shorter sequences, a ``bias``, and masks that are not key-padding masks fall
  back to "xla" (see :func:`splash_attention`).
* ``"context"``: context-parallel attention for long video token sequences whose length is split
  over the mesh's ``context`` axis: each device gathers the whole K and V and attends its own
  block of queries, with splash on TPU and "xla" elsewhere (see :func:`context_attention`).

Both read the mesh set by ``jax.set_mesh`` and the active logical rules
(:func:`vipo_jax.sharding.use_rules`) at trace time, and run their per-device computation inside
``jax.shard_map``; with no mesh they are plain single-device functions.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vipo_jax.nn.attention_registry import register_attention, xla_attention
from vipo_jax.sharding.rules import current_rules, logical_to_spec

log = logging.getLogger(__name__)

SPLASH_BLOCK = 128
"""Splash attention's smallest block (the TPU lane width): sequences are padded to a multiple of
it, and either sequence being shorter than it sends the call to "xla"."""

_SPLASH_BLOCKS = (512, 256, SPLASH_BLOCK)  # tried largest first; each must divide the padded length

# (batch, length, heads, head_dim): logical names of q, k, v for the per-device split.
_SPLIT_LENGTH = ("batch", "length", "act_heads", None)


def _mesh() -> Any | None:
    """The abstract mesh set by ``jax.set_mesh``, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _entry(spec: P, i: int) -> Any:
    """Mesh axes of dimension ``i`` of ``spec`` (``logical_to_spec`` drops trailing Nones)."""
    return spec[i] if i < len(spec) else None


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _as_4d(x: jax.Array) -> jax.Array:
    """A mask or bias broadcastable to (B, H, Lq, Lk), with its missing leading dims as size 1."""
    if x.ndim > 4:
        raise ValueError(f"attention mask/bias must be broadcastable to (batch, heads, q_len, kv_len), got {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


# --- splash ---------------------------------------------------------------------------------------
_warned_backend: list[str] = []


def _is_key_padding(mask: jax.Array | None) -> bool:
    """No mask, or one that depends only on the example and the key (splash's segment ids can
    express it; a mask over heads or query positions cannot be)."""
    return mask is None or _as_4d(mask).shape[1:3] == (1, 1)


def _block(length: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    """A splash MHA kernel for one example's (heads, q_len, head_dim) shapes, no static mask (all
    masking comes from segment ids). Cached: building it processes the block mask in numpy."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = _block(q_len), _block(kv_len)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, kv_ids: jax.Array | None, interpret: bool) -> jax.Array:
    """Splash on one device's (b, L, h, d) blocks, q already scaled; ``kv_ids`` (b, Lk) int32,
    1 for keys to attend, 0 for padding (None: no padding)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, lq, h, _ = q.shape
    lk = k.shape[1]
    kernel = _splash_kernel(h, lq, lk, interpret)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # splash: (heads, length, head_dim)
    if kv_ids is None:
        out = jax.vmap(lambda a, b, c: kernel(a, b, c))(qt, kt, vt)
    else:
        q_ids = jnp.ones((lq,), jnp.int32)  # every query (padding included) sees the valid keys
        out = jax.vmap(lambda a, b, c, ids: kernel(a, b, c, segment_ids=SegmentIds(q=q_ids, kv=ids)))(
            qt, kt, vt, kv_ids)
    return out.transpose(0, 2, 1, 3)


def _splash_or_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None, *,
                   scale: float | None, interpret: bool) -> jax.Array:
    """Splash on one device's arrays when it applies, else "xla" (see :func:`splash_attention`)."""
    b, lq, _, d = q.shape
    lk = k.shape[1]
    if bias is not None or not _is_key_padding(mask) or min(lq, lk) < SPLASH_BLOCK:
        return xla_attention(q, k, v, mask=mask, bias=bias, scale=scale)
    kv_valid = None if mask is None else jnp.broadcast_to(_as_4d(mask)[:, 0, 0, :], (b, lk)).astype(bool)
    scale = d ** -0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    lq_pad, lk_pad = _round_up(lq, SPLASH_BLOCK), _round_up(lk, SPLASH_BLOCK)
    kv_ids = None
    if kv_valid is not None or lk_pad != lk:
        valid = jnp.ones((b, lk), bool) if kv_valid is None else kv_valid
        # "xla" gives an example with no valid key a uniform softmax over all Lk keys (and no
        # gradient to q, k): attend to every real key with zero queries, so all logits are 0.
        some = valid.any(axis=1)
        valid = jnp.where(some[:, None], valid, True)
        q = jnp.where(some[:, None, None, None], q, jnp.zeros((), q.dtype))
        kv_ids = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, lk_pad - lk)))
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    out = _splash_local(pad(q, lq_pad), pad(k, lk_pad), pad(v, lk_pad), kv_ids, interpret)
    return out[:, :lq].astype(v.dtype)


def _on_tpu(interpret: bool | None, what: str) -> bool | None:
    """``interpret`` resolved: False on TPU, None (use "xla") elsewhere, with one warning."""
    if interpret is not None:
        return interpret
    backend = jax.default_backend()
    if backend == "tpu":
        return False
    if backend not in _warned_backend:
        _warned_backend.append(backend)
        log.warning("%s: splash attention needs a TPU (backend is %s); using 'xla' attention", what, backend)
    return None


def _spec4(spec: P) -> tuple[Any, Any, Any, Any]:
    return tuple(_entry(spec, i) for i in range(4))


def _side_spec(x: jax.Array, q_spec: tuple, shape: Sequence[int]) -> P:
    """Spec of a 4-d mask/bias (B, H, Lq, Lk) per device: split like q along every dimension it is
    not broadcast on (batch, heads, query positions), whole along the keys."""
    split = (q_spec[0], q_spec[2], q_spec[1])
    return P(*(split[i] if x.shape[i] == shape[i] and x.shape[i] > 1 else None for i in range(3)), None)


def per_device(local: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
               mask: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """``local(q, k, v, mask, bias)`` on each device's shard, in ``jax.shard_map`` under the mesh.

    Batch and heads are split as the rules split ``batch`` and ``act_heads``; queries stay split
    along the length as ``length`` says (``context``); K and V are all-gathered along the length
    (their gradient is a reduce-scatter); a mask/bias is split like q where it is not broadcast
    and whole along the keys (a key-padding mask is gathered like K). No mesh: ``local`` alone."""
    mesh = _mesh()
    if mesh is None:
        return local(q, k, v, mask, bias)
    rules = current_rules()
    q_spec = _spec4(logical_to_spec(_SPLIT_LENGTH, rules, mesh, q.shape))
    k_spec = _spec4(logical_to_spec(_SPLIT_LENGTH, rules, mesh, k.shape))
    if not any(q_spec) and not any(k_spec):
        return local(q, k, v, mask, bias)
    gather = _axes(k_spec[1])
    b, lq, h, _ = q.shape
    sides = [None if x is None else _as_4d(x) for x in (mask, bias)]
    side_specs = [None if x is None else _side_spec(x, q_spec, (b, h, lq)) for x in sides]

    def body(q_, k_, v_, mask_, bias_):
        if gather:
            k_, v_ = (jax.lax.all_gather(x, gather, axis=1, tiled=True) for x in (k_, v_))
        return local(q_, k_, v_, mask_, bias_)

    # check_vma=False: pallas_call has no replication rule; every output is split like q anyway.
    return jax.shard_map(body, in_specs=(P(*q_spec), P(*k_spec), P(*k_spec), *side_specs), out_specs=P(*q_spec),
                         check_vma=False)(q, k, v, *sides)


def _xla_local(q, k, v, mask, bias, *, scale):
    return xla_attention(q, k, v, mask=mask, bias=bias, scale=scale)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                     bias: jax.Array | None = None, scale: float | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Pallas TPU splash attention with the registry's interface ((B, L, H, D) layout).

    What the kernel runs: a full (non-causal) attention per example (``vmap`` over the batch),
    q pre-scaled by ``scale``, lengths padded to a multiple of :data:`SPLASH_BLOCK` with the
    padded keys masked through segment ids, and a key-padding ``mask`` (broadcastable to
    (B, 1, 1, Lk)) expressed the same way. An example whose keys are all masked attends uniformly
    to all real keys, exactly like "xla". Blocks: the largest of 512, 256, 128 dividing the padded
    length.

    Falls back to "xla" (same result, materialised logits) for: a ``bias`` (splash has none);
    a ``mask`` that depends on the head or the query position (a general bool mask would need a
    per-example dynamic block mask); a per-device Lq or Lk below :data:`SPLASH_BLOCK`, where one
    padded block would be mostly padding.

    ``interpret``: None runs the kernel on TPU and "xla" elsewhere (with one warning, so CPU
    tools such as the planner can trace a TPU config); True runs the kernel in Pallas interpret
    mode on any backend (slow: tests only); False always runs the compiled TPU kernel.

    Under a mesh the kernel runs per device in ``jax.shard_map``: batch split as the rules split
    ``batch`` (``data``, ``fsdp``), heads as ``act_heads`` (``tensor``). If the rules also split
    the sequence (``length`` on ``context``), queries stay split and K, V are gathered, as in
    :func:`context_attention` (gathering the queries too would repeat the work on every device).
    """
    interpret = _on_tpu(interpret, "attention='splash'")
    if interpret is None or bias is not None or not _is_key_padding(mask):
        return xla_attention(q, k, v, mask=mask, bias=bias, scale=scale)
    return per_device(functools.partial(_splash_or_xla, scale=scale, interpret=interpret), q, k, v, mask, None)


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      bias: jax.Array | None = None, scale: float | None = None,
                      interpret: bool | None = None) -> jax.Array:
    """Context-parallel attention: the sequence is split over the mesh axes of the logical name
    ``length`` (``context`` by default); each device all-gathers K and V along them
    (``jax.lax.all_gather(..., tiled=True)``) and attends its own block of queries.

    Batch and heads stay split as the rules say (``batch``: ``data``, ``fsdp``; ``act_heads``:
    ``tensor``). A ``mask`` or ``bias`` (broadcastable to (B, H, Lq, Lk)) is split like q along
    the dimensions it has and whole along the keys, so key-padding masks are gathered like K.
    The gradient of the gather is a reduce-scatter, so dK and dV come back split.

    The per-device attention is splash on TPU (where it applies, see :func:`splash_attention`;
    ``interpret`` as there) and "xla" elsewhere. Memory per device: the whole K and V
    (B/dp, Lk, H/tp, D), plus with "xla" the logits of Lq/cp queries; compute is split cp ways.
    With no mesh, or when neither sequence is split on this mesh (axis size 1, or a length it does
    not divide), this is that per-device attention on the whole arrays (GSPMD shards the rest).
    """
    if interpret is None and jax.default_backend() == "tpu":
        interpret = False
    local = (functools.partial(_xla_local, scale=scale) if interpret is None
             else functools.partial(_splash_or_xla, scale=scale, interpret=interpret))
    return per_device(local, q, k, v, mask, bias)


register_attention("splash", splash_attention)
register_attention("context", context_attention)
