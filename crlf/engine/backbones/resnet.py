"""torchvision ResNets with the CIFAR or the ImageNet stem."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torchvision import models

from crlf.engine.backbones.base import BackboneSpec, CheckpointedStage, Family, checkpointed, register


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' -> 'cifar' for images of at most 64 px (a stride-2 stem would throw away most pixels), else 'imagenet'."""
    if stem != "auto":
        return stem
    return "cifar" if image_size <= 64 else "imagenet"


@register
class ResNets(Family):
    """torchvision ResNets without their classifier (fc = Identity); the CIFAR stem replaces conv1 by a 3x3 stride-1
    conv and drops the max-pool."""

    name = "resnet"
    ARCHS: ClassVar[dict[str, tuple[Any, int]]] = {
        "resnet18": (models.resnet18, 512),
        "resnet34": (models.resnet34, 512),
        "resnet50": (models.resnet50, 2048),
    }

    def owns(self, arch: str) -> bool:
        return arch in self.ARCHS

    def spec(self, arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
        return BackboneSpec(arch, image_size, self.ARCHS[arch][1], stem=resolve_stem(stem, image_size))

    def problem(self, spec: BackboneSpec) -> str | None:
        if spec.stem not in ("cifar", "imagenet"):
            return f"unknown stem {str(spec.stem)[:40]!r}, expected cifar or imagenet"
        if spec.feature_dim != self.ARCHS[spec.arch][1]:
            return f"feature_dim {spec.feature_dim} for a {spec.arch}, whose features have {self.ARCHS[spec.arch][1]}"
        return None

    def build(self, spec: BackboneSpec) -> nn.Module:
        net = self.ARCHS[spec.arch][0](weights=None)
        if spec.stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return net

    def checkpoint_activations(self, net: nn.Module) -> None:
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            checkpointed(stage, CheckpointedStage)

    def plain_code(self, spec: BackboneSpec) -> str:
        lines = [f"net = torchvision.models.{spec.arch}(num_classes=1); net.fc = torch.nn.Identity()"]
        if spec.stem == "cifar":
            lines.append("net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity()")
        return "\n".join(lines)
