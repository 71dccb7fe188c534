"""Backbones (torchvision ResNets with a CIFAR or ImageNet stem) and the projection head."""

from __future__ import annotations

from torch import nn
from torchvision import models

ARCHS = {"resnet18": (models.resnet18, 512), "resnet34": (models.resnet34, 512), "resnet50": (models.resnet50, 2048)}


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' -> 'cifar' for images of at most 64 px (a stride-2 stem would throw away most pixels), else 'imagenet'."""
    if stem != "auto":
        return stem
    return "cifar" if image_size <= 64 else "imagenet"


def build_backbone(arch: str, stem: str) -> nn.Module:
    """A torchvision ResNet without its classifier (fc = Identity), so its keys load into plain torchvision.

    The CIFAR stem replaces conv1 by a 3x3 stride-1 conv and drops the max-pool; output: (B, feature_dim).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}': choose one of {', '.join(ARCHS)}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem '{stem}': choose cifar or imagenet")
    net = ARCHS[arch][0](weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def feature_dim(arch: str) -> int:
    """Width of the backbone's output features."""
    return ARCHS[arch][1]


def build_head(in_dim: int, hidden: int, out: int, layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """Projection MLP: (layers - 1) x [Linear, BatchNorm, ReLU] then Linear; dropout before every hidden layer but the
    first."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for i in range(layers - 1):
        if dropout > 0 and i > 0:
            blocks.append(nn.Dropout(dropout))
        blocks += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    if dropout > 0 and layers > 1:
        blocks.append(nn.Dropout(dropout))
    blocks.append(nn.Linear(dim, out))
    return nn.Sequential(*blocks)
