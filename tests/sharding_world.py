"""A synthetic world for the sharding tests: the tiny MLP velocity field of test_train_step with
logical axis names on its parameters and activation constraints, wired like a real world so the
whole train loop (mesh, placement, global batches, checkpoints) runs on it in seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import flux
from tests.test_train_step import DECODER, PROJ, C, H, W, decode_fn, feature_fn
from vipo_jax.data.prompts import PromptLoader
from vipo_jax.nn.annotate import linear_init
from vipo_jax.sharding import constrain
from vipo_jax.toy.rewards import redness
from vipo_jax.worlds.flux import step_config

E = 4  # conditioning width
N_PROMPTS = 16


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


class _Loader:
    def __init__(self, batch_size: int, seed: int):
        self._l = PromptLoader(num_records=N_PROMPTS, batch_size=batch_size, seed=seed,
                               process_index=jax.process_index(), process_count=jax.process_count())

    def next(self):
        return np.asarray(next(self._l)["index"])

    def state(self):
        return self._l.state()

    def restore(self, s):
        self._l.restore(s)


class SyntheticWorld:
    main_reward = "redness"
    png_scale = 2
    latent_shape = (H, W, C)

    def __init__(self, c):
        self.policy = Velocity(nnx.Rngs(0))
        self.graphdef = nnx.graphdef(self.policy)
        self.frozen = {"dec": np.asarray(DECODER), "proj": np.asarray(PROJ)}
        self.step_config = step_config(c)
        self.cond = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (N_PROMPTS, E)), np.float32)
        self.reward_fns = {"redness": lambda frozen, images, batch: redness(images)}
        self.decode_fn, self.feature_fn = decode_fn, feature_fn

    def velocity_fn(self, params, x, sigma, cond):
        return nnx.merge(self.graphdef, params)(x, sigma, cond)

    def prompt_loader(self, c):
        return _Loader(c.sampling.prompts_per_iter, c.seed)

    def batch(self, indices):
        return {"cond": {"emb": self.cond[indices]}}

    def eval_inputs(self, c):
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (4, H, W, C)), np.float32)
        return {"emb": self.cond[:4]}, noise, [f"p{i}" for i in range(4)]

    def eval_metrics(self, images, prompts):
        return {"redness": float(np.mean(np.asarray(redness(jnp.asarray(images)))))}


def tiny_config(iterations: int = 2, **mesh):
    c = flux.get_config("toy")
    c.seed = 0
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
    for k, v in {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **mesh}.items():
        c.mesh[k] = v
    return c
