"""LoRA adapters: attaching them leaves the output unchanged, each scanned block applies its own
slice, only adapters are trainable, merging reproduces the adapted output, and bad settings fail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vipo_jax.errors import ConfigError
from vipo_jax.nn.lora import Linear, LoraConfig, add_lora, merge_lora
from vipo_jax.nn.stack import make_stack, scan_stack


class Block(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "heads"))
        self.attn = Linear(8, 8, kernel_init=init, rngs=rngs)
        self.mlp = Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.mlp(jax.nn.gelu(self.attn(x)))


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.blocks = make_stack(Block, 3, rngs)
        self.head = Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(scan_stack(self.blocks, x))


X = jax.random.normal(jax.random.PRNGKey(1), (2, 8))


def _reference(m: Tiny, x):
    """The adapted forward written out per layer with explicit W + s A B (numpy, float64)."""
    h = np.asarray(x, np.float64)
    for i in range(3):
        def lin(mod, v, i=i):
            w = np.asarray(mod.kernel[...][i], np.float64)
            if mod.lora_a is not None:
                w = w + mod.lora_scale * np.asarray(mod.lora_a[...][i], np.float64) @ np.asarray(mod.lora_b[...][i])
            return v @ w + np.asarray(mod.bias[...][i])
        a = lin(m.blocks.attn, h)
        h = h + lin(m.blocks.mlp, np.asarray(jax.nn.gelu(jnp.asarray(a, jnp.float32)), np.float64))
    return h @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])


def test_add_train_merge():
    m = Tiny(nnx.Rngs(0))
    y0 = np.asarray(m(X))
    paths = add_lora(m, LoraConfig(rank=2, alpha=4, targets=("attn",)), nnx.Rngs(1))
    assert paths == ["blocks.attn"]
    assert m.blocks.attn.lora_a.shape == (3, 8, 2) and m.blocks.attn.lora_b.shape == (3, 2, 8)
    assert m.blocks.attn.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert m.blocks.attn.lora_b.get_metadata()["out_sharding"] == ("layers", None, "heads")
    np.testing.assert_array_equal(np.asarray(m(X)), y0)  # B = 0: unchanged at start

    gd, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
    assert len(jax.tree.leaves(lora)) == 2  # only the adapters are trainable

    def loss(lo):
        return jnp.sum(nnx.merge(gd, lo, rest)(X) ** 2)

    g = jax.grad(loss)(lora)
    # B = 0 at the start: only B gets a gradient on the first step (as in the LoRA paper's init)
    assert float(jnp.abs(g["blocks"]["attn"]["lora_b"][...]).max()) > 0
    assert float(jnp.abs(g["blocks"]["attn"]["lora_a"][...]).max()) == 0
    for _ in range(2):
        lora = jax.tree.map(lambda a, b: a - 0.1 * b, lora, g)
        g = jax.grad(loss)(lora)
    nnx.update(m, lora)
    y1 = np.asarray(m(X))
    assert not np.allclose(y1, y0)
    np.testing.assert_allclose(y1, _reference(m, X), rtol=1e-5, atol=1e-5)  # per-layer slices in the scan
    assert merge_lora(m) == 1 and m.blocks.attn.lora_a is None
    np.testing.assert_allclose(np.asarray(m(X)), y1, rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="targets is empty"):
        LoraConfig(rank=4)
    with pytest.raises(ConfigError, match="rank must be"):
        LoraConfig(rank=-1, targets=("x",))
    with pytest.raises(ConfigError, match="not a regular expression"):
        LoraConfig(rank=2, targets=("(",))
    with pytest.raises(ConfigError, match="match no adaptable layer"):
        add_lora(Tiny(nnx.Rngs(0)), LoraConfig(rank=2, targets=("nothing_here",)), nnx.Rngs(0))
    assert LoraConfig(rank=8, alpha=16, targets=("a",)).scale == 2.0
    assert LoraConfig.from_config({"rank": 4, "alpha": 0.0, "targets": "to_q, to_k"}).targets == ("to_q", "to_k")
