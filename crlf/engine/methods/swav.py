"""SwAV (Caron et al. 2020): swapped prediction of online cluster assignments, with multi-crop.

Backbone -> projection MLP (``--head-hidden`` 2048, ``--head-out`` 128) -> L2 normalisation -> prototypes (a linear
layer without bias, K = ``--prototypes`` unit-norm rows). The codes of each global crop come from Sinkhorn-Knopp
on the scores of the global batch; every other crop predicts them through a softmax at ``--temperature`` (0.1).
Conventions (official code: facebookresearch/swav, main_swav.py):

- Sinkhorn-Knopp: 3 iterations, epsilon 0.05, no gradient, on the scores of *every* process's batch, so the
  columns sum to 1 / B_global exactly as the official ``distributed_sinkhorn`` (which all_reduces the sums);
  here the scores are gathered and the same arithmetic runs on the whole batch (the largest score is subtracted
  before the exponential, which the first normalisation cancels).
- loss: for each global crop i (``crops_for_assign`` 0, 1), the mean over the other crops v of
  -mean_b sum_k q_i log softmax(p_v / temperature); then the mean over i, as the official loop.
- prototypes are renormalised to unit rows before the first step and after every step (official: at the start of
  each iteration) and frozen during the first epoch (official ``freeze_prototypes_niters``: about one ImageNet
  epoch): their gradient is zero there, and the optimizer's step on them (weight decay, Adam's momentum) is
  undone in after_step, so they keep their initial values.
- no queue: the official queue (``queue_length``, from epoch 15) helps batches below ~256 on ImageNet; CIFAR-size
  runs here use batches of 256-512 and go without it.
- crops: augment.multi_crop (2 global crops with the settings' crop scale, ``--local-crops`` local ones of 5-40%
  of the area at ``--local-size`` px; official ImageNet: 0.14-1 and 0.05-0.14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.heads import build_head
from crlf.engine.methods import Method, full_precision, multi_crop_views, per_crop_size, register
from crlf.settings import PretrainSettings

EPSILON = 0.05  # official --epsilon
SINKHORN_ITERATIONS = 3  # official --sinkhorn_iterations


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = EPSILON, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Codes (B, K) of scores (B, K): exp(scores / epsilon) scaled alternately so that each prototype gets 1 / K of
    the mass and each sample 1 / B, then rows multiplied by B (each sample's code sums to 1)."""
    q = torch.exp((scores - scores.max()) / epsilon).t()  # (K, B), as the official code
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swav_loss(scores: list[torch.Tensor], temperature: float, assign: int = 2) -> torch.Tensor:
    """The swapped prediction loss of the per-crop prototype scores (crop, B, K): codes of the first `assign` crops,
    predicted by every other crop."""
    total = scores[0].new_zeros(())
    for i in range(assign):
        q = sinkhorn(scores[i].detach())
        others = [v for v in range(len(scores)) if v != i]
        terms = [-(q * F.log_softmax(scores[v] / temperature, dim=1)).sum(1).mean() for v in others]
        total = total + torch.stack(terms).mean()
    return total / assign


@register
class SwAV(Method):
    """Backbone + projection head + prototypes; swapped prediction of Sinkhorn-Knopp codes over multi-crop views."""

    name = "swav"
    defaults = {
        "head_hidden": 2048,
        "head_out": 128,
        "prototypes": 3000,  # official ImageNet and solo-learn's CIFAR value
        "temperature": 0.1,
        "local_crops": 4,
        "local_size": 16,
    }

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.head = build_head(feature_dim, settings.head_hidden, settings.head_out, settings.head_layers,
                               settings.head_dropout)  # fmt: skip
        self.prototypes = nn.Linear(settings.head_out, settings.prototypes, bias=False)
        self.register_buffer("frozen", torch.tensor(True))  # prototypes frozen this step: set by after_step
        self.temperature = settings.temperature
        self.epochs = settings.epochs
        self._normalise_prototypes()
        self._before: torch.Tensor | None = None  # the prototypes before a frozen step (not state: within a step)

    def views(self, batch: torch.Tensor, settings: PretrainSettings, gen: torch.Generator) -> list[torch.Tensor]:
        return multi_crop_views(batch, settings, gen)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        w = self.prototypes.weight
        if self.training:
            self._before = w.detach().clone()
        # frozen: zero gradient, but still in the graph (DDP expects every parameter to get one)
        w = torch.where(self.frozen, w.detach() + 0 * w, w)
        z = per_crop_size(lambda x: F.normalize(self.head(self.backbone(x)), dim=1), views)
        z = [distributed.gather(x) for x in z]  # the loss of the global batch, with gradients
        with full_precision(z[0]):
            scores = [F.linear(x.float(), w.float()) for x in z]
            return swav_loss(scores, self.temperature)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self._normalise_prototypes()
        w = self.prototypes.weight
        if self._before is not None:  # undo the optimizer's step on frozen prototypes (no host sync: a where)
            w = torch.where(self.frozen, self._before, w)
            self._before = None
        self.prototypes.weight.copy_(w)
        self.frozen.fill_(step < total_steps // self.epochs)  # the first epoch's steps

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
