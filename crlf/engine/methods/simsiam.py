"""SimSiam (Chen & He 2021): one encoder, a predictor, and a stop-gradient instead of a momentum teacher.

    loss = -cos(p1, stopgrad(z2)) / 2 - cos(p2, stopgrad(z1)) / 2   (each cosine averaged over the batch)

with z = projector(backbone(x)) and p = predictor(z). The projector is the paper's three layers,
[Linear, BN, ReLU] x 2 then Linear and a BatchNorm without affine parameters on the output (the bias of the last
Linear, cancelled by that BatchNorm, is frozen as in solo-learn); it always has three layers (the config has no
``head_layers``), widths ``--head-hidden`` /
``--head-out`` (2048/2048, solo-learn's CIFAR config). The predictor is the bottleneck Linear-BN-ReLU-Linear with
hidden width ``--pred-hidden`` (512). Two SimCLR views; predictions and projections are gathered over every process
(the loss of the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import negative_cosine
from crlf.engine.methods.base import Method, full_precision, register


@dataclass(frozen=True)
class SimSiamConfig:
    """SimSiam's options (solo-learn's CIFAR widths)."""

    head_hidden: int = 2048
    head_out: int = 2048
    head_dropout: float = 0.0
    pred_hidden: int = 512


@register
class SimSiam(Method):
    """Backbone + 3-layer projector + bottleneck predictor; symmetric negative cosine with stop-gradient."""

    name = "simsiam"
    Config = SimSiamConfig
    per_image_loss = True  # a mean over images: --micro-batch accumulates its chunks
    config: SimSiamConfig

    def __init__(self, backbone: nn.Module, config: SimSiamConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = nn.Sequential(
            *build_head(self.feature_dim, c.head_hidden, c.head_out, 3, c.head_dropout),
            nn.BatchNorm1d(c.head_out, affine=False),
        )
        self.head[-2].bias.requires_grad_(False)  # followed by BatchNorm: it would only drift (solo-learn's hack)
        self.predictor = build_head(c.head_out, c.pred_hidden, c.head_out, 2)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        z1, z2 = (distributed.gather(v) for v in z.chunk(2))
        p1, p2 = (distributed.gather(v) for v in p.chunk(2))
        with full_precision(z):
            z1, z2, p1, p2 = z1.float(), z2.float(), p1.float(), p2.float()
            return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
