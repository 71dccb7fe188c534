"""A user's own module (crlf.pretrain(..., backbone=module)): recorded, not rebuilt."""

from __future__ import annotations

from torch import nn

from crlf.engine.backbones.base import BackboneSpec, Family, register, width
from crlf.errors import InputError

CUSTOM = "custom"


@register
class Custom(Family):
    """Any nn.Module a Python user trains (crlf.pretrain(..., backbone=module)): crlf cannot rebuild it, so an
    encoder file of one records arch 'custom' and load_encoder asks for the module."""

    name = "custom"

    def owns(self, arch: str) -> bool:
        return arch == CUSTOM

    def check(self, arch: str) -> None:
        raise InputError("--arch custom is a module of your own: pass it from Python, "
                         "crlf.pretrain(settings, backbone=module)")  # fmt: skip

    def build(self, spec: BackboneSpec) -> nn.Module:
        raise InputError("this encoder's backbone is a module of your own, which crlf cannot rebuild: load it with "
                         "crlf.load_encoder(path, backbone=YourModule())")  # fmt: skip

    def plain_code(self, spec: BackboneSpec) -> str:
        return "backbone = YourModule()  # the module the encoder was trained with"


def custom_spec(net: nn.Module, image_size: int) -> BackboneSpec:
    """The spec of a user's own backbone: its feature width read off one forward pass at `image_size` px."""
    was = net.training
    try:
        return BackboneSpec(CUSTOM, image_size, int(width(net, "custom", image_size)))
    finally:
        net.train(was)
