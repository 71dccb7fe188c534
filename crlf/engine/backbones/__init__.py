"""Backbones: a registry of families (torchvision ResNets, torchvision ViTs, any timm model, a user's own module)
behind one spec (base.py); each family is one module here and registers itself on import.

    spec = backbones.spec_for("resnet18", image_size=32)   # a BackboneSpec: JSON in every encoder file
    net = backbones.build(spec)                             # (B, 3, H, W) -> (B, spec.feature_dim)
"""

# ruff: noqa: I001 - the families register on import, in the order family_of tries them
from crlf.engine.backbones.base import (
    BackboneSpec,
    Family,
    build,
    check,
    checkpoint_activations,
    defaults,
    describe,
    family_of,
    names,
    no_weight_decay,
    register,
    spec_for,
    width,
)
from crlf.engine.backbones import resnet, vit, timm  # noqa: F401
from crlf.engine.backbones.custom import CUSTOM, custom_spec

__all__ = ["CUSTOM", "BackboneSpec", "Family", "build", "check", "checkpoint_activations", "custom_spec", "defaults",
           "describe", "family_of", "names", "no_weight_decay", "register", "spec_for", "width"]  # fmt: skip
