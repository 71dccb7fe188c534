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

from dataclasses import dataclass

import torch

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import barlow_loss, spread
from crlf.engine.methods.base import Method, full_precision, opt, register, two_views


@dataclass(frozen=True)
class BarlowConfig:
    """Barlow Twins' options (solo-learn's CIFAR projector and loss scale)."""

    head_hidden: int = 2048
    head_out: int = 2048
    head_layers: int = 3
    head_dropout: float = 0.0
    barlow_lambda: float = opt(0.0051, "Weight of the redundancy (off-diagonal) term.", ge=0.0, le=1e3)
    barlow_scale: float = opt(0.1, "Factor on the loss (1: the official code's).", gt=0.0, le=1e3)


@register
class BarlowTwins(Method):
    """Backbone + 3-layer projector; redundancy reduction on the cross-correlation matrix of the two views."""

    name = "barlow"
    Config = BarlowConfig
    config: BarlowConfig
    optimizer = "lars"

    def __init__(self, backbone: torch.nn.Module, config: BarlowConfig | None = None, feature_dim: int | None = None):
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
            return barlow_loss(z1, z2, self.config.barlow_lambda, self.config.barlow_scale)
