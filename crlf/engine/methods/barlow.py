"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of the two views' projections the identity.

Conventions (written down because implementations differ):

- Standardisation: each projection dimension is standardised along the *global* batch like a BatchNorm without
  affine parameters in training mode (the official code's ``bn``): biased variance, eps 1e-5 inside the square
  root. The projections are gathered from every process with their gradients first, so N processes compute the
  loss of one process on the whole batch (the official code gets the same through SyncBatchNorm + all_reduce).
- c = z1_std^T z2_std / N (N: the global batch), loss = sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2.
- The loss is multiplied by ``barlow_scale``: 0.1 by default, solo-learn's ``scale_loss`` for CIFAR (it keeps the
  loss, and so the gradients, within the range SGD / LARS learning rates tuned for SimCLR expect); 1.0 gives the
  official code's (and the paper's) loss.
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
from crlf.settings import PretrainSettings

BN_EPS = 1e-5  # torch.nn.BatchNorm1d's, as in the official code's affine-free bn


def standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Each column to zero mean and unit (biased) variance along the batch, as BatchNorm1d(affine=False) trains."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale: float = 1.0) -> torch.Tensor:
    """Barlow Twins loss of the projections z1, z2 (N, D) of the two views (the whole batch), in float32."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    c = standardise(z1.float()).T @ standardise(z2.float()) / n  # (D, D) cross-correlation
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


def spread(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: mean over dimensions of the batch std of the L2-normalised projections (detached)."""
    with torch.no_grad():
        return torch.cat([F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)]).std(dim=0).mean()


@register
class BarlowTwins(Method):
    """Backbone + 3-layer projector; redundancy reduction on the cross-correlation matrix of the two views."""

    name = "barlow"
    defaults = {"head_hidden": 2048, "head_out": 2048, "head_layers": 3, "barlow_lambda": 0.0051, "barlow_scale": 0.1,
                "optimizer": "lars"}  # fmt: skip

    def __init__(self, backbone: torch.nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.head = build_head(feature_dim, settings.head_hidden, settings.head_out, settings.head_layers,
                               settings.head_dropout)  # fmt: skip
        self.lambd = settings.barlow_lambda
        self.scale = settings.barlow_scale
        self.last_std: torch.Tensor | None = None  # collapse indicator of the latest forward (see the module doc)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = pair(lambda x: self.head(self.backbone(x)), views)  # the global batch, with gradients
        with full_precision(z1):
            self.last_std = spread(z1, z2)
            return barlow_loss(z1, z2, self.lambd, self.scale)
