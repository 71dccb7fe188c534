"""MoCo v2 (Chen et al. 2020, "Improved baselines with momentum contrastive learning"), symmetric as solo-learn's
mocov2plus; and, with ``--queue-size 0``, MoCo v3's queue-free form (Chen, Xie, He 2021).

MoCo v2: the online encoder (backbone + projection MLP, Linear-ReLU-Linear with no BatchNorm, solo-learn's
projector) gives queries q, a momentum copy of it gives keys k under no_grad (the stop-gradient); InfoNCE with
temperature tau (0.2) contrasts each query with its own key of the other view (positive) and with a queue of
keys from past batches (negatives):

    loss = (nce(q1, k2, queue[1]) + nce(q2, k1, queue[0])) / 2,
    nce(q, k, Q) = mean_i CE([q_i . k_i, q_i . Q^T] / tau, target 0)

with q, k and the queue L2-normalised. There are two queues, one per view, as in solo-learn: queue[1] holds keys of
the second view, which the first view's queries are compared with. The queues (``queue.bank``, (2, size, dim),
float32) and their write position (``queue.ptr``) are buffers, so a checkpoint holds them. After each forward in
training mode the keys of the global batch (gathered over every process, no gradient) replace the oldest entries;
the queue may have any size: writes wrap around, and a batch larger than the queue keeps its last `size` keys. The queue
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
projector depth (2: MoCo v2's), ``head_dropout`` its dropout. The queue is a MemoryBank (crlf.engine.queue).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.heads import build_head, mlp_blocks, projection_head
from crlf.engine.loss import in_batch_nce, info_nce
from crlf.engine.methods.base import Method, full_precision, opt, register
from crlf.engine.methods.teacher import frozen_copy
from crlf.engine.queue import MemoryBank


@dataclass(frozen=True)
class MoCoConfig:
    """MoCo's options (CIFAR-size defaults; see the module docstring)."""

    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2
    head_dropout: float = 0.0
    temperature: float = 0.2
    queue_size: int = opt(4096, "Negative keys kept; 0: MoCo v3-style (in-batch negatives).", identity=True,
                          ge=0, le=262144)  # fmt: skip
    momentum: float = 0.99
    pred_hidden: int = 4096  # the predictor of the queue-free form


@register
class MoCo(Method):
    """Query encoder + momentum key encoder; InfoNCE against a queue of past keys (or in-batch keys, queue 0)."""

    name = "moco"
    Config = MoCoConfig
    config: MoCoConfig

    def __init__(self, backbone: nn.Module, config: MoCoConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        if c.queue_size:  # MoCo v2's projector: no BatchNorm
            self.head = projection_head(
                mlp_blocks(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout, False)
            )
            self.predictor = None
        else:  # v3-style: BatchNorm in the MLPs, a predictor on the online side
            self.head = build_head(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout)
            self.predictor = build_head(c.head_out, c.pred_hidden, c.head_out, 2)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        # two queues, one per view: queue.bank[1] holds keys of the second view
        self.queue = MemoryBank(c.queue_size, c.head_out, views=2) if c.queue_size else None

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Queries of both views, then their keys (no gradient)."""
        x = torch.cat(views[:2])
        q = self.head(self.backbone(x))
        if self.predictor is not None:
            q = self.predictor(q)
        with torch.no_grad():  # the stop-gradient: keys come from the momentum encoder
            k = self.teacher_head(self.teacher_backbone(x))
        return [*q.chunk(2), *k.chunk(2)]

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        q1, q2 = (distributed.gather(t) for t in embeddings[:2])
        with torch.no_grad():
            k1, k2 = (distributed.gather(t.detach()) for t in embeddings[2:])
        t = self.config.temperature
        with full_precision(q1):
            q1, q2 = F.normalize(q1.float(), dim=1), F.normalize(q2.float(), dim=1)
            k1, k2 = F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)
            if self.queue is None:
                return in_batch_nce(q1, k2, t) + in_batch_nce(q2, k1, t)
            queue = self.queue.bank.clone()  # the loss keeps its negatives; the enqueue below writes in place
            loss = (info_nce(q1, k2, queue[1], t) + info_nce(q2, k1, queue[0], t)) / 2
        if self.training:
            self.queue.enqueue(torch.stack([k1, k2]))
        return loss

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]
