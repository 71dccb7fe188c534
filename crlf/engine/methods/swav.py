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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import swav_loss
from crlf.engine.methods.base import Method, full_precision, per_crop_size, register


@dataclass(frozen=True)
class SwAVConfig:
    """SwAV's options (the official prototype count, also solo-learn's for CIFAR)."""

    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2
    head_dropout: float = 0.0
    prototypes: int = 3000
    temperature: float = 0.1
    local_crops: int = 4
    local_size: int = 16


@register
class SwAV(Method):
    """Backbone + projection head + prototypes; swapped prediction of Sinkhorn-Knopp codes over multi-crop views."""

    name = "swav"
    Config = SwAVConfig
    config: SwAVConfig

    def __init__(self, backbone: nn.Module, config: SwAVConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = build_head(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout)
        self.prototypes = nn.Linear(c.head_out, c.prototypes, bias=False)
        self.register_buffer("frozen", torch.tensor(True))  # prototypes frozen this step: set by after_step
        self._normalise_prototypes()
        self._before: torch.Tensor | None = None  # the prototypes before a frozen step (not state: within a step)

    @classmethod
    def recipe(cls, config: SwAVConfig, aug: augment.Augment, image_size: int) -> augment.Recipe:
        """Multi-crop: 2 global views at the images' size, then the local crops."""
        return augment.multi_crop_recipe(aug, config.local_crops, min(config.local_size, image_size))

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The normalised projections of every crop (the prototypes are the objective's)."""
        return per_crop_size(lambda x: F.normalize(self.head(self.backbone(x)), dim=1), views)

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        w = self.prototypes.weight
        if self.training:
            self._before = w.detach().clone()
        # frozen: zero gradient, but still in the graph (DDP expects every parameter to get one)
        w = torch.where(self.frozen, w.detach() + 0 * w, w)
        z = [distributed.gather(x) for x in embeddings]  # the loss of the global batch, with gradients
        with full_precision(z[0]):
            scores = [F.linear(x.float(), w.float()) for x in z]
            return swav_loss(scores, self.config.temperature)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, epochs: int) -> None:
        self._normalise_prototypes()
        w = self.prototypes.weight
        if self._before is not None:  # undo the optimizer's step on frozen prototypes (no host sync: a where)
            w = torch.where(self.frozen, self._before, w)
            self._before = None
        self.prototypes.weight.copy_(w)
        self.frozen.fill_(step < total_steps // epochs)  # the first epoch's steps

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
