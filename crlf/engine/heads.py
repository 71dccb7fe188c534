"""The projection head every method puts on its backbone (backbones live in backbones.py)."""

from __future__ import annotations

from torch import nn


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
