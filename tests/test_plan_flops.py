"""The planner's analytic FLOP formulas against XLA's cost analysis of loop-free (unrolled)
forwards of tiny Flux and Wan DiTs: they must agree within 10% (XLA also counts elementwise work)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.flux.flops import flux_forward_flops
from vipo_jax.models.flux.packing import latent_image_ids, text_ids
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan.flops import wan_forward_flops
from vipo_jax.nn.stack import unrolled_stacks
from vipo_jax.training.throughput import iteration_flops


def xla_flops(fn, *args) -> float:
    with unrolled_stacks():
        compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_flux_forward_flops_match_xla():
    cfg = FluxConfig(num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=4,
                     joint_attention_dim=96, pooled_projection_dim=48, in_channels=16, guidance_embeds=True,
                     axes_dims_rope=(8, 12, 12))
    gd, st = nnx.split(nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0))))
    ni, nt = 64, 20

    def fwd(st, img, txt, pooled, t, g):
        return nnx.merge(gd, st)(img, txt, pooled, t, latent_image_ids(16, 16), text_ids(nt), guidance=g)

    xla = xla_flops(fwd, st, sds(1, ni, 16), sds(1, nt, 96), sds(1, 48), sds(1), sds(1))
    ours = flux_forward_flops(cfg, ni, nt)
    assert abs(ours / xla - 1) < 0.10, (ours, xla)


def test_wan_forward_flops_match_xla():
    cfg = WanConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                    text_dim=48, freq_dim=32, ffn_dim=128)
    gd, st = nnx.split(nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0))))
    f, h, w, nt = 3, 8, 12, 16

    def fwd(st, lat, t, txt):
        return nnx.merge(gd, st)(lat, t, txt)

    xla = xla_flops(fwd, st, sds(1, f, h, w, 4), sds(1), sds(1, nt, 48))
    ours = wan_forward_flops(cfg, f * (h // 2) * (w // 2), nt)
    assert abs(ours / xla - 1) < 0.10, (ours, xla)


def test_iteration_flops():
    it = iteration_flops(10.0, samples=4, num_steps=8, trained_steps=4, remat="full", cfg_passes=2, frozen=5.0)
    assert it.rollout == 4 * 8 * 20 and it.train == 4 * 4 * 3 * 20 and it.recompute == 4 * 4 * 20
    assert it.model_flops == it.rollout + it.train + 5.0
    assert it.hardware_flops == it.model_flops + it.recompute
    assert iteration_flops(10.0, samples=4, num_steps=8, trained_steps=4).recompute == 0


def test_unrolled_stacks_restores():
    from vipo_jax.nn import stack

    with unrolled_stacks():
        assert stack._UNROLL_ALL
    assert not stack._UNROLL_ALL
