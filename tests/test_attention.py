"""The attention registry and its scale-out kernels: "splash" (Pallas TPU splash attention, run
here in Pallas interpret mode on CPU) and "context" (context-parallel, checked on 8 simulated CPU
devices in a subprocess, tests/attention_worker.py), each against the "xla" reference in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipo_jax import sharding as shd
from vipo_jax.errors import ConfigError
from vipo_jax.models.wan import WanConfig
from vipo_jax.nn.attention import attention, available_attention, xla_attention
from vipo_jax.nn.attention_kernels import SPLASH_BLOCK, context_attention, splash_attention

ROOT = Path(__file__).resolve().parent.parent
TOL = 2e-5  # float32 rounding, relative to max(1, max |reference|)


def _qkv(b: int, lq: int, lk: int, h: int = 2, d: int = 32, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, lq, h, d), jnp.float32),
            *(jax.random.normal(kk, (b, lk, h, d), jnp.float32) for kk in ks[1:]))


def _key_padding(lengths: tuple[int, ...], lk: int) -> jax.Array:
    return (jnp.arange(lk)[None, :] < jnp.array(lengths)[:, None])[:, None, None, :]


def _close(got, want) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=TOL * max(1.0, float(np.abs(w).max())))


def _uses_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_registry_and_config_validation():
    assert {"xla", "cudnn", "splash", "context"} <= set(available_attention())
    assert WanConfig(attention="context").attention == "context"
    assert WanConfig(attention="splash").attention == "splash"
    with pytest.raises(ConfigError, match="unknown"):
        WanConfig(attention="ring")
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        attention(q, k, v, implementation="nope")


# --- splash, interpret mode ------------------------------------------------------------------------
SPLASH_CASES = {
    # name: (batch, q_len, kv_len, key lengths or None, scale)
    "aligned": (1, 256, 256, None, None),  # one 256 block, no segment ids
    "padded+mask": (2, 200, 200, (150, 0), 0.3),  # padded to 256; the second example has no valid key
    "cross": (2, 128, 300, (300, 77), None),  # Lq != Lk, keys padded to 384
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_interpret_matches_xla(case):
    b, lq, lk, lengths, scale = SPLASH_CASES[case]
    q, k, v = _qkv(b, lq, lk, seed=1)
    mask = None if lengths is None else _key_padding(lengths, lk)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def value_and_grads(fn):
        def loss(q, k, v):
            o = fn(q, k, v, mask=mask, scale=scale)
            return jnp.sum(o * w), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    splash = lambda *a, **kw: splash_attention(*a, **kw, interpret=True)
    assert _uses_pallas(lambda q, k, v: splash(q, k, v, mask=mask, scale=scale), q, k, v)
    (_, got), ggot = value_and_grads(splash)(q, k, v)
    (_, want), gwant = value_and_grads(xla_attention)(q, k, v)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want)
    _close(ggot, gwant)


def test_splash_fallbacks_to_xla():
    """bias, masks over heads/queries, sequences below one block, and (on CPU) the registry path
    without interpret mode all run "xla" and give its result."""
    q, k, v = _qkv(2, 128, 128, seed=2)
    bias = jax.random.normal(jax.random.key(3), (1, 2, 128, 128))
    general = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 2, 128, 128))
    short = _qkv(2, SPLASH_BLOCK // 2, SPLASH_BLOCK // 2, seed=5)
    for args, kw in (((q, k, v), dict(bias=bias)), ((q, k, v), dict(mask=general)), (short, {}),
                     (short, dict(mask=_key_padding((64, 10), 64)))):
        fn = lambda q, k, v, kw=kw: splash_attention(q, k, v, interpret=True, **kw)
        assert not _uses_pallas(fn, *args)
        _close(fn(*args), xla_attention(*args, **kw))
    assert jax.default_backend() != "tpu"
    via_registry = lambda q, k, v: attention(q, k, v, implementation="splash")
    assert not _uses_pallas(via_registry, q, k, v)
    _close(via_registry(q, k, v), xla_attention(q, k, v))


# --- context, single device ------------------------------------------------------------------------
def test_context_without_a_split_is_xla():
    q, k, v = _qkv(2, 16, 12, seed=6)
    mask = _key_padding((12, 5), 12)
    want = xla_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(context_attention(q, k, v, mask=mask)), np.asarray(want))
    with shd.activate(shd.single_device_mesh(), shd.make_rules()):
        got = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, implementation="context"))(q, k, v)
    _close(got, want)


def test_context_local_kernel_can_be_splash():
    """On TPU the per-device attention of "context" is splash: here in interpret mode."""
    q, k, v = _qkv(1, 128, 256, seed=7)
    mask = _key_padding((130,), 256)
    fn = lambda q, k, v: context_attention(q, k, v, mask=mask, interpret=True)
    assert _uses_pallas(fn, q, k, v)
    _close(jax.jit(fn)(q, k, v), xla_attention(q, k, v, mask=mask))


# --- 8 simulated devices ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    proc = subprocess.run([sys.executable, "-m", "tests.attention_worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _check(result: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert result[key] <= TOL * max(1.0, result["scale"]), (key, result)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["context=8", "context=4,tensor=2", "data=2,context=4"])
def test_context_parallel_matches_xla(multi_device, mesh):
    """Self-attention with a key-padding mask (values and gradients) and cross-attention with a
    general mask and a bias, sequences split over context, vs one device."""
    _check(multi_device[f"context {mesh}"], ("out", "grad", "cross"))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["context=8", "data=2,context=4"])
def test_wan_dit_context_parallel_matches_unsharded(multi_device, mesh):
    _check(multi_device[f"wan {mesh}"], ("out",))


@pytest.mark.slow
def test_splash_under_mesh_matches_xla(multi_device):
    _check(multi_device["splash data=2,context=2,tensor=2"], ("out", "grad"))
