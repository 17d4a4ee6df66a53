"""vipo_jax: Visual Preference Policy Optimization (ViPO) in JAX / Flax NNX."""

__version__ = "0.1.0"

from flax import nnx as _nnx

# Parameters carry logical axis names as metadata (see docs/PORTING.md); they are placed on devices
# by vipo_jax's loaders and sharding rules, never eagerly at creation (which would need a mesh).
_nnx.use_eager_sharding(False)
