"""SimCLR (Chen et al. 2020): two views, backbone + MLP projection head, NT-Xent over every process's embeddings."""

from __future__ import annotations

import torch

from crlf.engine.heads import build_head
from crlf.engine.loss import nt_xent
from crlf.engine.methods import Method, full_precision, pair, register
from crlf.settings import PretrainSettings


@register
class SimCLR(Method):
    """Backbone + projection head; the loss compares the two views of each image with all other views."""

    name = "simclr"
    defaults = {"head_hidden": 2048, "head_out": 128, "temperature": 0.2}

    def __init__(self, backbone: torch.nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.head = build_head(feature_dim, settings.head_hidden, settings.head_out, settings.head_layers,
                               settings.head_dropout)  # fmt: skip
        self.temperature = settings.temperature

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = pair(lambda x: self.head(self.backbone(x)), views)  # the global batch, with gradients
        with full_precision(z1):
            return nt_xent(z1, z2, self.temperature)
