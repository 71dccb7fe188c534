"""SimSiam (Chen & He 2021): one encoder, a predictor, and a stop-gradient instead of a momentum teacher.

    loss = -cos(p1, stopgrad(z2)) / 2 - cos(p2, stopgrad(z1)) / 2   (each cosine averaged over the batch)

with z = projector(backbone(x)) and p = predictor(z). The projector is the paper's three layers,
[Linear, BN, ReLU] x 2 then Linear and a BatchNorm without affine parameters on the output (the bias of the last
Linear, cancelled by that BatchNorm, is frozen as in solo-learn); it has three layers whatever ``--head-layers``
says (that option's default, 2, is SimCLR's and cannot be told from an explicit 2), widths ``--head-hidden`` /
``--head-out`` (2048/2048, solo-learn's CIFAR config). The predictor is the bottleneck Linear-BN-ReLU-Linear with
hidden width ``--pred-hidden`` (512). Two SimCLR views; predictions and projections are gathered over every process
(the loss of the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.methods import Method, full_precision, register
from crlf.settings import PretrainSettings


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean_i cos(p_i, z_i), with z detached (the stop-gradient)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


@register
class SimSiam(Method):
    """Backbone + 3-layer projector + bottleneck predictor; symmetric negative cosine with stop-gradient."""

    name = "simsiam"
    defaults = {"head_hidden": 2048, "head_out": 2048, "head_layers": 3, "pred_hidden": 512}  # always 3 layers

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        out = settings.head_out
        self.head = nn.Sequential(
            *build_head(feature_dim, settings.head_hidden, out, 3, settings.head_dropout),
            nn.BatchNorm1d(out, affine=False),
        )
        self.head[-2].bias.requires_grad_(False)  # followed by BatchNorm: it would only drift (solo-learn's hack)
        self.predictor = build_head(out, settings.pred_hidden, out, 2)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        z1, z2 = (distributed.gather(v) for v in z.chunk(2))
        p1, p2 = (distributed.gather(v) for v in p.chunk(2))
        with full_precision(z):
            z1, z2, p1, p2 = z1.float(), z2.float(), p1.float(), p2.float()
            return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
