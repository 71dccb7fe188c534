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

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.heads import build_head
from crlf.engine.methods import Method, full_precision, register
from crlf.engine.methods.teacher import ema_, frozen_copy, momentum_at
from crlf.settings import PretrainSettings

BLUR_MIN_SIZE = 33  # images at least this large get BYOL's blur (1.0 / 0.1)
RECIPE = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})


def regression_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE: mean over rows of 2 - 2 cos(p, t)."""
    return (2 - 2 * F.cosine_similarity(p, t, dim=1)).mean()


def view_settings(settings: PretrainSettings, size: int) -> list[PretrainSettings]:
    """The augmentation settings of the two views of `size`-pixel images (see the module docstring)."""
    out = []
    for recipe in RECIPE:
        update = {}
        if settings.blur_p == 0 and size >= BLUR_MIN_SIZE:
            update["blur_p"] = recipe["blur_p"]
        if settings.solarize_p == 0:
            update["solarize_p"] = recipe["solarize_p"]
        out.append(settings.model_copy(update=update))
    return out


def _cat(a: augment.AugmentParams, b: augment.AugmentParams) -> augment.AugmentParams:
    """Two batches' parameters as one; an op off (None) in one batch and on in the other becomes a False mask."""
    fields = {}
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x is None and y is None:
            fields[name] = None
            continue
        if x is None or y is None:
            ref = y if x is None else x
            off = torch.zeros_like(ref)  # False for masks; not reached for noise_std (the same in both views)
            x, y = (off, y) if x is None else (x, off)
        fields[name] = torch.cat([x, y])
    return augment.AugmentParams(**fields)


def asymmetric_views(
    batch: torch.Tensor | augment.Crops, settings: PretrainSettings, gen: torch.Generator
) -> list[torch.Tensor]:
    """BYOL's two views of a uint8 batch as float in [0, 1]: view 1's parameters, then view 2's, from `gen`."""
    n, (h, w) = len(batch), batch.shape[-2:]
    size = min(h, w)
    params = [augment.sample_params(n, h, w, cfg, gen) for cfg in view_settings(settings, size)]
    x = augment.apply(augment.repeat(batch, 2), _cat(*params), size, gen)
    return [x[:n], x[n:]]


@register
class BYOL(Method):
    """Online backbone + projector + predictor; EMA target backbone + projector; symmetric regression loss."""

    name = "byol"
    defaults = {"head_hidden": 4096, "head_out": 256, "pred_hidden": 4096, "momentum": 0.99}

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.base_momentum = settings.momentum
        self.head = build_head(feature_dim, settings.head_hidden, settings.head_out, settings.head_layers,
                               settings.head_dropout)  # fmt: skip
        self.predictor = build_head(settings.head_out, settings.pred_hidden, settings.head_out, 2)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_head = frozen_copy(self.head)

    def views(self, batch: torch.Tensor, settings: PretrainSettings, gen: torch.Generator) -> list[torch.Tensor]:
        return asymmetric_views(batch, settings, gen)

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

    def after_step(self, step: int, total_steps: int) -> None:
        m = momentum_at(step, total_steps, self.base_momentum)
        ema_(self.target_backbone, self.backbone, m)
        ema_(self.target_head, self.head, m)
