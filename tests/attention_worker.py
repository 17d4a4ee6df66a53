"""Multi-device checks of the attention kernels, run by tests/test_attention.py in a subprocess
with 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
``python -m tests.attention_worker``. Prints one ``RESULT {json}`` line: for each check, the max
abs difference to the single-device "xla" result (and the reference's max abs value).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parent.parent
CONTEXT_MESHES = ({"context": 8}, {"context": 4, "tensor": 2}, {"data": 2, "context": 4})


def _setup() -> None:
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _name(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def _err(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _scale(want) -> float:
    return max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(want))


def _qkv(b: int, lq: int, lk: int, h: int, d: int, seed: int):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, h, d), jnp.float32)
    k, v = (jax.random.normal(kk, (b, lk, h, d), jnp.float32) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32)  # weights of the scalar loss
    return q, k, v, w


def _value_and_grads(impl: str, mask, bias, w):
    from vipo_jax.nn.attention import attention

    def loss(q, k, v):
        out = attention(q, k, v, mask=mask, bias=bias, implementation=impl)
        return jnp.sum(out * w), out

    def f(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return f


def context_checks(out: dict) -> None:
    from vipo_jax import sharding as shd

    rules = shd.make_rules()
    b, h, d = 2, 2, 16
    # self-attention with a key-padding mask (one example padded after 37 tokens)
    q, k, v, w = _qkv(b, 64, 64, h, d, 0)
    pad = (jnp.arange(64)[None, :] < jnp.array([64, 37])[:, None])[:, None, None, :]
    want = jax.jit(_value_and_grads("xla", pad, None, w))(q, k, v)
    # cross-attention: 24 keys (split too), a general (B, H, Lq, Lk) mask and a (1, H, Lq, Lk) bias
    qc, kc, vc, wc = _qkv(b, 64, 24, h, d, 1)
    gmask = jax.random.bernoulli(jax.random.key(5), 0.7, (b, h, 64, 24)).at[..., 0].set(True)
    gbias = jax.random.normal(jax.random.key(6), (1, h, 64, 24))
    want_c = jax.jit(_value_and_grads("xla", gmask, gbias, wc))(qc, kc, vc)
    for sizes in CONTEXT_MESHES:
        mesh = shd.make_mesh(sizes)
        with shd.activate(mesh, rules):
            split = NamedSharding(mesh, shd.logical_to_spec(("batch", "length", "act_heads", None), rules, mesh,
                                                            q.shape))
            args = jax.device_put((q, k, v), split)
            f = jax.jit(_value_and_grads("context", pad, None, w)).lower(*args).compile()
            hlo = f.as_text()
            got = f(*args)
            got_c = jax.jit(_value_and_grads("context", gmask, gbias, wc))(qc, kc, vc)
        assert "all-gather" in hlo, "context attention did not gather K/V"
        assert got[0].sharding.spec[1] is not None, got[0].sharding  # output stays split along length
        out[f"context {_name(sizes)}"] = {"out": _err(got[0], want[0]), "grad": _err(got[1], want[1]),
                                          "cross": _err(got_c, want_c), "scale": _scale(want)}


def splash_checks(out: dict) -> None:
    """splash (interpret mode) inside shard_map: batch on data, heads on tensor, queries split over
    context (128 per device) with K and V gathered, a key-padding mask; values and gradients."""
    from vipo_jax import sharding as shd
    from vipo_jax.nn.attention import xla_attention
    from vipo_jax.nn.attention_kernels import splash_attention

    rules = shd.make_rules()
    q, k, v, w = _qkv(2, 256, 256, 2, 32, 2)
    pad = (jnp.arange(256)[None, :] < jnp.array([256, 100])[:, None])[:, None, None, :]

    def f(impl):
        def loss(q, k, v):
            o = impl(q, k, v, mask=pad)
            return jnp.sum(o * w), o
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    (_, want), gwant = jax.jit(f(xla_attention))(q, k, v)
    sizes = {"data": 2, "context": 2, "tensor": 2}
    mesh = shd.make_mesh(sizes)
    splash = f(lambda *a, **kw: splash_attention(*a, **kw, interpret=True))
    with shd.activate(mesh, rules):
        args = jax.device_put((q, k, v), NamedSharding(mesh, P("data", "context", "tensor")))
        jaxpr = str(jax.make_jaxpr(splash)(*args))
        (_, got), ggot = jax.jit(splash)(*args)
    assert "pallas_call" in jaxpr and "all_gather" in jaxpr, "splash did not run per device with K/V gathered"
    out[f"splash {_name(sizes)}"] = {"out": _err(got, want), "grad": _err(ggot, gwant),
                                     "scale": _scale((want, gwant))}


def wan_checks(out: dict) -> None:
    """A tiny Wan DiT with attention="context" under context-parallel meshes vs the unsharded
    model with "xla" (same initialisation)."""
    from flax import nnx

    from vipo_jax import sharding as shd
    from vipo_jax.models.wan import WanConfig, WanTransformer

    tiny = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 2, 8, 8, 4)).astype(np.float32)  # 2 x 4 x 4 = 32 video tokens
    t = np.array([300.0, 700.0], np.float32)
    text = rng.standard_normal((2, 12, 32)).astype(np.float32)  # 12 text tokens: not split over 8
    fwd = jax.jit(lambda m, *a: m(*a))
    want = fwd(WanTransformer(WanConfig(**tiny), rngs=nnx.Rngs(0)), latents, t, text)
    model = WanTransformer(WanConfig(**tiny, attention="context"), rngs=nnx.Rngs(0))
    rules = shd.make_rules()
    for sizes in ({"context": 8}, {"data": 2, "context": 4}):
        mesh = shd.make_mesh(sizes)
        with shd.activate(mesh, rules):
            compiled = fwd.lower(model, latents, t, text).compile()
            got = compiled(model, latents, t, text)
        assert "all-gather" in compiled.as_text(), "the Wan DiT did not run context-parallel attention"
        out[f"wan {_name(sizes)}"] = {"out": _err(got, want), "scale": _scale(want)}


def main() -> None:
    _setup()
    assert jax.device_count() == 8, jax.devices()
    out: dict = {}
    context_checks(out)
    wan_checks(out)
    splash_checks(out)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
