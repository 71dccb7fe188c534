"""NT-Xent, the SimCLR contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross entropy over 2N views: each view's positive is the other view of its image,
    every other view in the batch is a negative. z1, z2: (N, D), not yet normalised. Returns the mean over 2N anchors.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D); float32 even under autocast
    logits = z @ z.T / temperature  # (2N, 2N) cosine similarities / tau
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    targets = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(logits, targets)
