"""Projection heads described as data (lightly's ``ProjectionHead(blocks)``): every method builds its MLPs here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


@dataclass(frozen=True)
class Block:
    """One layer: [Dropout], Linear(in_dim, out_dim) (no bias when BatchNorm follows), [BatchNorm1d], [activation]."""

    in_dim: int
    out_dim: int
    batch_norm: bool = True
    activation: str | None = "relu"  # a key of ACTIVATIONS, or None
    dropout: float = 0.0  # before the Linear


def projection_head(blocks: list[Block]) -> nn.Sequential:
    """The MLP of `blocks`, flat (module indices, and so state_dict keys, are the layers in order)."""
    layers: list[nn.Module] = []
    for b in blocks:
        if b.dropout > 0:
            layers.append(nn.Dropout(b.dropout))
        layers.append(nn.Linear(b.in_dim, b.out_dim, bias=not b.batch_norm))
        if b.batch_norm:
            layers.append(nn.BatchNorm1d(b.out_dim))
        if b.activation is not None:
            layers.append(ACTIVATIONS[b.activation]())
    return nn.Sequential(*layers)


def mlp_blocks(
    in_dim: int, hidden: int, out: int, layers: int = 2, dropout: float = 0.0, batch_norm: bool = True,
    activation: str = "relu",
) -> list[Block]:  # fmt: skip
    """(layers - 1) hidden blocks [Linear, BatchNorm?, activation] then a plain Linear to `out`; dropout before every
    Linear but the first (SimCLR's head: BatchNorm, ReLU; MoCo v2's: no BatchNorm; DINO's: no BatchNorm, GELU)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out]
    return [
        Block(dims[i], dims[i + 1], batch_norm and i < layers - 1, activation if i < layers - 1 else None,
              dropout if i > 0 else 0.0)
        for i in range(layers)
    ]  # fmt: skip


def build_head(in_dim: int, hidden: int, out: int, layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """The common projection MLP: (layers - 1) x [Linear, BatchNorm, ReLU] then Linear."""
    return projection_head(mlp_blocks(in_dim, hidden, out, layers, dropout))
