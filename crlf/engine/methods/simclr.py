"""SimCLR (Chen et al. 2020): two views, backbone + MLP projection head, NT-Xent over every process's embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import nt_xent
from crlf.engine.methods.base import Method, full_precision, register, two_views


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR's options; the defaults suit CIFAR-size images (the paper's CIFAR-10 head: 2048 hidden, 128 out)."""

    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2
    head_dropout: float = 0.0
    temperature: float = 0.2


@register
class SimCLR(Method):
    """Backbone + projection head; the loss compares the two views of each image with all other views."""

    name = "simclr"
    Config = SimCLRConfig
    config: SimCLRConfig

    def __init__(self, backbone: torch.nn.Module, config: SimCLRConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = build_head(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout)

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return two_views(lambda x: self.head(self.backbone(x)), views)

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (distributed.gather(z) for z in embeddings)  # the global batch, with gradients
        with full_precision(z1):
            return nt_xent(z1, z2, self.config.temperature)
