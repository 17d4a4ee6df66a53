"""vipo_jax: Visual Preference Policy Optimization (ViPO) in JAX / Flax NNX."""

__version__ = "0.1.0"
