"""MoCo v2 (Chen et al. 2020, "Improved baselines with momentum contrastive learning"), symmetric as solo-learn's
mocov2plus; and, with ``--queue-size 0``, MoCo v3's queue-free form (Chen, Xie, He 2021).

MoCo v2: the online encoder (backbone + projection MLP, Linear-ReLU-Linear with no BatchNorm, solo-learn's
projector) gives queries q, a momentum copy of it gives keys k under no_grad (the stop-gradient); InfoNCE with
temperature tau (0.2) contrasts each query with its own key of the other view (positive) and with a queue of
keys from past batches (negatives):

    loss = (nce(q1, k2, queue[1]) + nce(q2, k1, queue[0])) / 2,
    nce(q, k, Q) = mean_i CE([q_i . k_i, q_i . Q^T] / tau, target 0)

with q, k and the queue L2-normalised. There are two queues, one per view, as in solo-learn: queue[1] holds keys of
the second view, which the first view's queries are compared with. The queues (``queue``, (2, size, dim), float32)
and their write position (``queue_ptr``) are buffers, so a checkpoint holds them. After each forward in training
mode the keys of the global batch (gathered over every process, no gradient) replace the oldest entries; the queue
may have any size: writes wrap around, and a batch larger than the queue keeps its last `size` keys. The queue
starts as random unit vectors (from the seeded generator at construction), as in the official code.

The key encoder follows the online one by EMA after each optimizer step, with BYOL's cosine schedule from
``--momentum`` (0.99) to 1 over the run (solo-learn's CIFAR configs: 0.99 -> 0.999; the MoCo v2 paper: 0.999
constant, for 200 ImageNet epochs; 0.99 suits short CIFAR-size runs). No shuffled BatchNorm (solo-learn has none
either); with several processes ``--sync-bn`` is the alternative.

Queries and keys are gathered over every process, so the loss is that of the global batch (as simclr's).

``--queue-size 0``: MoCo v3-style. The projector gets BatchNorm (the head of ``build_head``), a predictor MLP
(``--pred-hidden``, 4096) follows it on the online side, and negatives are the other keys of the global batch:
loss = 2 tau (CE(q1 k2^T / tau, diagonal) + CE(q2 k1^T / tau, diagonal)), the official code's scaling. Head sizes
keep moco's defaults (2048/128; v3's paper uses 4096/256: pass them). No ViT-specific tricks (frozen patch embedding).

Defaults (CIFAR-size images): head 2048/128, temperature 0.2, queue 4096, momentum 0.99. ``head_layers`` sets the
projector depth (2: MoCo v2's), ``head_dropout`` its dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.methods import Method, full_precision, register
from crlf.engine.methods.teacher import ema_, frozen_copy, momentum_at
from crlf.settings import PretrainSettings


def projector(in_dim: int, hidden: int, out: int, layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """MoCo v2's MLP: (layers - 1) x [Linear, ReLU] then Linear, no BatchNorm; dropout as ``build_head``'s."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for i in range(layers - 1):
        if dropout > 0 and i > 0:
            blocks.append(nn.Dropout(dropout))
        blocks += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
        dim = hidden
    if dropout > 0 and layers > 1:
        blocks.append(nn.Dropout(dropout))
    blocks.append(nn.Linear(dim, out))
    return nn.Sequential(*blocks)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: normalised queries q (N, D), their positive keys k (N, D), negatives `queue` (K, D)."""
    pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    neg = q @ queue.T  # (N, K)
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def in_batch_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss of one direction: q_i against every key, k_i the positive; scaled by 2 tau as the official
    code does."""
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * (2 * temperature)


@register
class MoCo(Method):
    """Query encoder + momentum key encoder; InfoNCE against a queue of past keys (or in-batch keys, queue 0)."""

    name = "moco"
    defaults = {"head_hidden": 2048, "head_out": 128, "temperature": 0.2, "queue_size": 4096, "momentum": 0.99,
                "pred_hidden": 4096}  # fmt: skip

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.temperature = settings.temperature
        self.base_momentum = settings.momentum
        self.queue_size = settings.queue_size
        hidden, out, layers, drop = settings.head_hidden, settings.head_out, settings.head_layers, settings.head_dropout
        if self.queue_size:
            self.head = projector(feature_dim, hidden, out, layers, drop)
            self.predictor = None
        else:  # v3-style: BatchNorm in the MLPs, a predictor on the online side
            self.head = build_head(feature_dim, hidden, out, layers, drop)
            self.predictor = build_head(out, settings.pred_hidden, out, 2)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        if self.queue_size:
            self.register_buffer("queue", F.normalize(torch.randn(2, self.queue_size, out), dim=-1))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(views[:2])
        q = self.head(self.backbone(x))
        if self.predictor is not None:
            q = self.predictor(q)
        with torch.no_grad():  # the stop-gradient: keys come from the momentum encoder
            k = self.teacher_head(self.teacher_backbone(x))
        q1, q2 = (distributed.gather(t) for t in q.chunk(2))
        with torch.no_grad():
            k1, k2 = (distributed.gather(t) for t in k.chunk(2))
        with full_precision(q):
            q1, q2 = F.normalize(q1.float(), dim=1), F.normalize(q2.float(), dim=1)
            k1, k2 = F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)
            if not self.queue_size:
                return in_batch_nce(q1, k2, self.temperature) + in_batch_nce(q2, k1, self.temperature)
            queue = self.queue.clone()  # the loss keeps its negatives; the enqueue below writes in place
            loss = (info_nce(q1, k2, queue[1], self.temperature) + info_nce(q2, k1, queue[0], self.temperature)) / 2
        if self.training:
            self.enqueue(torch.stack([k1, k2]))
        return loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write normalised keys (2, N, D) of the global batch over the oldest queue entries, wrapping around."""
        n_all = keys.shape[1]
        n = min(n_all, self.queue_size)
        # positions ptr + (n_all - n) ... : a batch larger than the queue keeps its newest keys; device-side, no sync
        idx = (self.queue_ptr + (n_all - n) + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue.index_copy_(1, idx, keys[:, n_all - n :].to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n_all) % self.queue_size)

    def after_step(self, step: int, total_steps: int) -> None:
        m = momentum_at(step, total_steps, self.base_momentum)
        ema_(self.teacher_backbone, self.backbone, m)
        ema_(self.teacher_head, self.head, m)
