"""Worlds: a model family (``flux``, ``wan``) with weights from a source (toy assets, a pretrained
folder, random weights or shapes only), wired into the pure callables the train step composes.
``build_world(c, source=...)`` is the only constructor; importing this package registers the
families and the toy world's rewards."""

from vipo_jax.toy import rewards as _toy_rewards  # noqa: F401  (registers the toy rewards)
from vipo_jax.worlds import flux, wan
from vipo_jax.worlds.build import SOURCES, build_world, check_world_config, source_of
from vipo_jax.worlds.family import FAMILIES, Family, ToyModels, WorldOptions, get_family, register_family
from vipo_jax.worlds.world import BASE_KEY, EVAL_SEED, PromptTable, World

__all__ = ["BASE_KEY", "EVAL_SEED", "FAMILIES", "SOURCES", "Family", "PromptTable", "ToyModels", "World",
           "WorldOptions", "build_world", "check_world_config", "flux", "get_family", "register_family",
           "source_of", "wan"]
