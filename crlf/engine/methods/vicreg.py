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

import torch
import torch.nn.functional as F

from crlf.engine.heads import build_head
from crlf.engine.methods import Method, full_precision, pair, register
from crlf.engine.methods.barlow import off_diagonal, spread
from crlf.settings import PretrainSettings

VAR_EPS = 1e-4  # the official code's, inside the square root of the variance


def std_loss(z: torch.Tensor) -> torch.Tensor:
    """Hinge on the std of each dimension along the batch: mean_d relu(1 - sqrt(var_d + eps)), var unbiased."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + VAR_EPS)).mean()


def cov_loss(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal entries of the unbiased (N - 1) covariance matrix, divided by D."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """VICReg loss of the projections z1, z2 (N, D) of the two views (the whole batch, N >= 2), in float32."""
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be (N, D) with N >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance = (std_loss(z1) + std_loss(z2)) / 2
    covariance = cov_loss(z1) + cov_loss(z2)
    return sim * invariance + std * variance + cov * covariance


@register
class VICReg(Method):
    """Backbone + 3-layer projector; invariance between views, variance and decorrelation within each."""

    name = "vicreg"
    defaults = {
        "head_hidden": 2048,
        "head_out": 2048,
        "head_layers": 3,
        "optimizer": "lars",  # SGD at the default lr diverged in 4 digits epochs; LARS (solo-learn's) did not
        "vicreg_sim": 25.0,
        "vicreg_std": 25.0,
        "vicreg_cov": 1.0,
    }

    def __init__(self, backbone: torch.nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.head = build_head(feature_dim, settings.head_hidden, settings.head_out, settings.head_layers,
                               settings.head_dropout)  # fmt: skip
        self.coeffs = (settings.vicreg_sim, settings.vicreg_std, settings.vicreg_cov)
        self.last_std: torch.Tensor | None = None  # collapse indicator of the latest forward (see the module doc)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = pair(lambda x: self.head(self.backbone(x)), views)  # the global batch, with gradients
        with full_precision(z1):
            self.last_std = spread(z1, z2)
            return vicreg_loss(z1, z2, *self.coeffs)
