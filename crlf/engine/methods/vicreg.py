"""VICReg (Bardes et al. 2022): invariance, variance and covariance terms on the two views' projections.

Conventions (the official facebookresearch/vicreg code's, written down because implementations differ):

- The projections of both views are gathered from every process with their gradients first, and all three terms
  are computed over the *global* batch of N rows, so N processes compute the loss of one process on the whole
  batch (the official code takes the invariance term per process, whose DDP-averaged gradient is the same).
- invariance: MSE(z1, z2), the mean over N x D entries;
- variance: std_loss(z) = mean_d relu(1 - sqrt(var_d(z) + 1e-4)), var unbiased (N - 1), and the term is
  (std_loss(z1) + std_loss(z2)) / 2;
- covariance: cov(z) = (z - mean)^T (z - mean) / (N - 1) (unbiased), cov_loss(z) = sum of the squared off-diagonal
  entries / D, and the term is cov_loss(z1) + cov_loss(z2) (summed, not averaged, as the official code does);
- loss = vicreg_sim * invariance + vicreg_std * variance + vicreg_cov * covariance, coefficients 25, 25, 1.
- Projector: 3 linear layers, [Linear, BatchNorm, ReLU] x 2 then Linear, 2048-2048-2048 (solo-learn's CIFAR).

Collapse indicator: ``last_std``, the std across the global batch of the L2-normalised projections, averaged over
dimensions (both views): near 0 when the embeddings collapse, about 1/sqrt(head_out) when they spread. A detached
device tensor, updated by every forward (no host sync; read it rarely); not saved in the state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import spread, vicreg_loss
from crlf.engine.methods.base import Method, full_precision, opt, register, two_views


@dataclass(frozen=True)
class VICRegConfig:
    """VICReg's options (the official coefficients; solo-learn's CIFAR projector)."""

    head_hidden: int = 2048
    head_out: int = 2048
    head_layers: int = 3
    head_dropout: float = 0.0
    vicreg_sim: float = opt(25.0, "Weight of the invariance (MSE) term.", ge=0.0, le=1e4)
    vicreg_std: float = opt(25.0, "Weight of the variance (std) term.", ge=0.0, le=1e4)
    vicreg_cov: float = opt(1.0, "Weight of the covariance term.", ge=0.0, le=1e4)


@register
class VICReg(Method):
    """Backbone + 3-layer projector; invariance between views, variance and decorrelation within each."""

    name = "vicreg"
    Config = VICRegConfig
    config: VICRegConfig
    optimizer = "lars"  # SGD at the default lr diverged in 4 digits epochs; LARS (solo-learn's) did not

    def __init__(self, backbone: torch.nn.Module, config: VICRegConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = build_head(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout)
        self.last_std: torch.Tensor | None = None  # collapse indicator of the latest forward (see the module doc)

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return two_views(lambda x: self.head(self.backbone(x)), views)

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (distributed.gather(z) for z in embeddings)  # the global batch, with gradients
        with full_precision(z1):
            self.last_std = spread(z1, z2)
            c = self.config
            return vicreg_loss(z1, z2, c.vicreg_sim, c.vicreg_std, c.vicreg_cov)
