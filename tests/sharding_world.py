"""A synthetic model family for the sharding tests: the tiny MLP velocity field of test_train_step
with logical axis names on its parameters and activation constraints, a fixed linear decoder and a
random-projection PSM backbone, registered like any family (``register_family``) and built by
``build_world`` from random weights, so the whole train loop (mesh, placement, global batches,
checkpoints) runs on it in seconds. It is also the test of the "add a model family" recipe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import flux
from tests.test_train_step import DECODER, PROJ, C, H, W, decode_fn, feature_fn
from vipo_jax.backbones import BackboneEntry, LoadedBackbone
from vipo_jax.backbones import register as register_backbone
from vipo_jax.nn.annotate import linear_init
from vipo_jax.sharding import constrain
from vipo_jax.worlds import Family, WorldOptions, register_family

E = 4  # conditioning width


class Velocity(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        def lin(i, o, names):
            return nnx.Linear(i, o, rngs=rngs, **linear_init(*names))

        self.l_in = lin(C + 1 + E, 64, (None, "embed"))
        self.l_up = lin(64, 128, ("embed", "mlp"))
        self.l_down = lin(128, 64, ("mlp", "embed"))
        self.l_out = lin(64, C, ("embed", None))

    def __call__(self, x, sigma, cond):
        b = x.shape[0]
        feats = jnp.concatenate([x, jnp.broadcast_to(sigma[:, None, None, None], (b, H, W, 1)),
                                 jnp.broadcast_to(cond["emb"][:, None, None, :], (b, H, W, E))], -1)
        h = constrain(self.l_in(feats), ("batch", None, None, "act_embed"))
        h = h + self.l_down(constrain(jax.nn.gelu(self.l_up(h)), ("batch", None, None, "act_mlp")))
        return self.l_out(h)


class Decoder(nnx.Module):
    """The fixed linear decoder of test_train_step as a (frozen) module."""

    def __init__(self):
        self.dec = nnx.Param(DECODER)

    def __call__(self, x0):
        return decode_fn({"dec": self.dec[...]}, x0)


class SyntheticFamily(Family):
    name = "synthetic"
    variants = ("dev",)
    lora_targets = (r"l_(up|down)$",)

    def options(self, c, policy, source):
        return WorldOptions(png_scale=2)

    def latent_shape(self, c, decoder):
        return (H, W, C)

    def velocity(self, policy, x, sigma, cond, options):
        return policy(x, sigma, cond)

    def decode(self, decoder, x0):
        return decoder(x0)

    def shaped_models(self, c, abstract):
        return Velocity(nnx.Rngs(0)), Decoder()

    def cond_specs(self, c, policy):
        return {"emb": jax.ShapeDtypeStruct((E,), jnp.float32)}, {}

    def describe(self, c):
        return "synthetic MLP"

    # the synthetic family has only random weights
    def toy_models(self, c):
        raise NotImplementedError

    def pretrained_models(self, c, root, sharding):
        raise NotImplementedError

    def pretrained_help(self, c, where):
        return "the synthetic family has no pretrained weights"

    def cache_tag(self, c):
        return "synthetic"

    def text_encoder(self, c, root):
        raise NotImplementedError

    def conditioning(self, embeds, extra):
        raise NotImplementedError

    def forward_flops(self, c, policy):
        return 0.0

    def flops_probe(self, c, policy):
        raise NotImplementedError


register_family(SyntheticFamily())
register_backbone(BackboneEntry(
    "synthetic_projection", lambda ctx: LoadedBackbone(lambda p, images: feature_fn({"proj": p}, images), PROJ),
    "a fixed random projection of 2x2-averaged pixels (tests)"))


def tiny_config(iterations: int = 2, **mesh):
    c = flux.get_config("toy")
    c.world = "random"
    c.model.family = "synthetic"
    c.psm.backbone_kind = "synthetic_projection"
    c.seed = 0
    c.sampling.height = c.sampling.width = 16
    c.sampling.num_steps = 6
    c.sampling.group_size = 4
    c.sampling.prompts_per_iter = 4
    c.train.iterations = iterations
    c.train.num_updates = 2
    c.optim.lr = 1e-3
    # Adam turns a float32 rounding difference of a near-zero gradient into a full +-lr step; a
    # larger eps keeps the sharded-vs-unsharded comparison of parameters well conditioned.
    c.optim.eps = 1e-4
    c.log.eval_every = 0
    c.log.ckpt_every = 0
    c.log.tensorboard = False
    c.log.phase_times = False
    c.log.num_eval_prompts = 4
    for k, v in {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **mesh}.items():
        c.mesh[k] = v
    return c
