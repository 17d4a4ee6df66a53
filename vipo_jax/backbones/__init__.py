"""PSM backbones by name (``registry``); importing this package registers the built-in ones."""

from vipo_jax.backbones import dinov2, pixels, resnet, sam
from vipo_jax.backbones.registry import (
    BACKBONES,
    BackboneContext,
    BackboneEntry,
    LoadedBackbone,
    get,
    register,
)

__all__ = ["BACKBONES", "BackboneContext", "BackboneEntry", "LoadedBackbone", "dinov2", "get", "pixels", "register",
           "resnet", "sam"]
