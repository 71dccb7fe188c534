"""BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) regresses a momentum target network
(backbone, projector) of the other view; no negatives.

    loss = l(p1, t2) + l(p2, t1),   l(p, t) = mean_i (2 - 2 cos(p_i, t_i))

summed over the two directions as the paper and solo-learn do (so it lies in [0, 8]). The target outputs t are
computed under no_grad and the target's parameters take no gradient (the stop-gradient). After each optimizer step
the target follows the online backbone and projector by EMA, tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2 with
k = step - 1 and K the run's steps: ``--momentum`` (0.99, solo-learn's CIFAR value; the paper's ImageNet 0.996) at
the first update, 1 at the end. Projector and predictor are Linear-BN-ReLU-Linear (``build_head``): projector
``--head-hidden``/``--head-out`` (4096/256), predictor ``--pred-hidden`` (4096) back to ``--head-out``.

Augmentation, BYOL's asymmetric pair: view 1 blur p 1.0, solarize p 0; view 2 blur p 0.1, solarize p 0.2. Blur
only on images larger than 32 px: CIFAR-size recipes leave it out (the SimCLR paper's CIFAR-10 runs; solo-learn's
CIFAR configs: gaussian_prob 0.0 for both views, solarization 0.0 / 0.2), so at 32 px and below both views keep
``--blur-p`` (0 by default). A non-zero ``--blur-p`` or ``--solarize-p`` replaces the recipe's for both views
(0, the default, means "BYOL's"). The two views' parameters are drawn from the one generator, view 1 then view 2,
and applied in one batched pass, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.heads import build_head
from crlf.engine.loss import regression_loss
from crlf.engine.methods.base import Method, full_precision, register
from crlf.engine.methods.teacher import frozen_copy

BLUR_MIN_SIZE = 33  # images at least this large get BYOL's blur (1.0 / 0.1)
RECIPE = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})


@dataclass(frozen=True)
class BYOLConfig:
    """BYOL's options (solo-learn's CIFAR values; see the module docstring)."""

    head_hidden: int = 4096
    head_out: int = 256
    head_layers: int = 2
    head_dropout: float = 0.0
    pred_hidden: int = 4096
    momentum: float = 0.99


def view_augments(aug: augment.Augment, size: int) -> tuple[augment.Augment, augment.Augment]:
    """The augmentation strengths of the two views of `size`-pixel images (see the module docstring)."""
    out = []
    for recipe in RECIPE:
        update = {}
        if aug.blur_p == 0 and size >= BLUR_MIN_SIZE:
            update["blur_p"] = recipe["blur_p"]
        if aug.solarize_p == 0:
            update["solarize_p"] = recipe["solarize_p"]
        out.append(replace(aug, **update))
    return out[0], out[1]


@register
class BYOL(Method):
    """Online backbone + projector + predictor; EMA target backbone + projector; symmetric regression loss."""

    name = "byol"
    Config = BYOLConfig
    per_image_loss = True  # a mean over images: --micro-batch accumulates its chunks
    config: BYOLConfig

    def __init__(self, backbone: nn.Module, config: BYOLConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = build_head(self.feature_dim, c.head_hidden, c.head_out, c.head_layers, c.head_dropout)
        self.predictor = build_head(c.head_out, c.pred_hidden, c.head_out, 2)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_head = frozen_copy(self.head)

    @classmethod
    def recipe(cls, config: BYOLConfig, aug: augment.Augment, image_size: int) -> augment.Recipe:
        """BYOL's asymmetric pair: view 1's parameters, then view 2's, drawn one after the other."""
        return augment.Recipe((augment.Pass(view_augments(aug, image_size), joint=False),))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(views[:2])
        p = self.predictor(self.head(self.backbone(x)))
        with torch.no_grad():  # the stop-gradient: the target only follows by EMA
            t = self.target_head(self.target_backbone(x))
        p1, p2 = (distributed.gather(v) for v in p.chunk(2))
        with torch.no_grad():
            t1, t2 = (distributed.gather(v) for v in t.chunk(2))
        with full_precision(p):
            return regression_loss(p1.float(), t2.float()) + regression_loss(p2.float(), t1.float())

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.head, self.target_head)]
