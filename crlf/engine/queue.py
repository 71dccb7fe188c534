"""A memory bank of past embeddings (lightly's ``MemoryBankModule``): MoCo's negative keys, and the nearest
neighbours of NNCLR-style methods later. Buffers, so a checkpoint holds it and a resume continues it exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """`size` rows of `dim` per view (views, size, dim), float32, that start as random unit vectors (drawn from the
    global generator at construction, as MoCo's official code) and are overwritten oldest first."""

    bank: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, views: int = 1):
        super().__init__()
        if size < 1:
            raise ValueError(f"a memory bank needs at least one row, got {size}")
        self.size = size
        self.register_buffer("bank", F.normalize(torch.randn(views, size, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write rows (views, N, dim) over the oldest entries, wrapping around; a batch larger than the bank keeps its
        newest `size` rows. Device-side arithmetic only: no host sync."""
        n_all = rows.shape[1]
        n = min(n_all, self.size)
        idx = (self.ptr + (n_all - n) + torch.arange(n, device=rows.device)) % self.size
        self.bank.index_copy_(1, idx, rows[:, n_all - n :].to(self.bank.dtype))
        self.ptr.copy_((self.ptr + n_all) % self.size)
