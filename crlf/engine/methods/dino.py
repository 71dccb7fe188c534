"""DINO (Caron et al. 2021): self-distillation with a momentum teacher, multi-crop, centring and sharpening.

The student (backbone + DINO head) sees every crop; the teacher, an EMA copy of the student that receives no
gradient, sees the two global crops. The loss is the cross-entropy between the teacher's centred, sharpened
softmax of one global crop and the student's softmax of every *other* crop, averaged over those pairs, as the
official ``DINOLoss``. Conventions (official code: facebookresearch/dino, main_dino.py):

- head: 3-layer MLP (GELU, no BatchNorm: ``use_bn_in_head`` False) to a bottleneck of ``--head-out`` (256), L2
  normalisation, then a weight-normalised linear layer without bias to K = ``--prototypes`` outputs whose norms
  are fixed at 1 (``norm_last_layer`` True). The MLP always has 3 layers (the config has no ``head_layers`` /
  ``head_dropout``). The official "freeze the last layer during the first epoch" is not done.
- teacher momentum: 1 - (1 - base) (cos(pi i / total) + 1) / 2 after iteration i (0-based), from ``--momentum``
  (0.996) to 1, as ``cosine_scheduler(momentum_teacher, 1, ...)``; EMA over the parameters only (the teacher's
  BatchNorm statistics are its own running statistics, as the official teacher's).
- teacher temperature: linear from 0.04 to ``--teacher-temperature`` (0.07) over the first 30 epochs, or the first
  30% of the run when it is shorter than 100 epochs (official: ``warmup_teacher_temp_epochs`` 30 of 100), then
  constant. Per step here, where the official schedule is per epoch. Student temperature: ``--temperature`` (0.1).
- centre: EMA 0.9 of the mean teacher output over the two global crops of the *global* batch (every process's,
  as the official ``all_reduce``), updated at the end of each forward, after the loss used the old centre.
- the two global crops use the settings' crop scale (DINO's ImageNet recipe: ``--crop-min-scale 0.4``), the local
  ones 5-40% of the area at ``--local-size`` px (augment.multi_crop); the colour recipe is the settings' for every
  crop (DINO's asymmetric blur / solarisation per global crop is not reproduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.heads import mlp_blocks, projection_head
from crlf.engine.loss import dino_loss
from crlf.engine.methods.base import Method, full_precision, opt, per_crop_size, register
from crlf.engine.methods.teacher import frozen_copy

CENTER_MOMENTUM = 0.9  # official DINOLoss(center_momentum=0.9)
WARMUP_TEACHER_TEMPERATURE = 0.04  # official --warmup_teacher_temp
WARMUP_EPOCHS = 30  # official --warmup_teacher_temp_epochs (of 100 by default)


@dataclass(frozen=True)
class DINOConfig:
    """DINO's options (the official recipe's, with solo-learn's CIFAR prototype count)."""

    head_hidden: int = 2048
    head_out: int = 256  # the bottleneck
    prototypes: int = 4096  # official ImageNet 65536
    temperature: float = 0.1  # the student's
    teacher_temperature: float = opt(0.07, "Teacher temperature after a warm-up from 0.04.", gt=0.0, le=100.0)
    momentum: float = 0.996
    local_crops: int = 4
    local_size: int = 16


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalise -> weight-normalised linear (unit-norm rows) to K outputs."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = projection_head(mlp_blocks(in_dim, hidden, bottleneck, 3, batch_norm=False, activation="gelu"))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the official _init_weights
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm(Linear(bottleneck, K, bias=False)) with g fixed at 1: the direction v alone is trained
        self.last_layer = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.kaiming_uniform_(self.last_layer, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer, dim=1))


def teacher_temperature(final: float, step: int, total_steps: int, epochs: int) -> float:
    """The teacher temperature at 0-based step `step`: linear from 0.04 (or `final` if lower) to `final` over
    min(30, 0.3 x epochs) epochs' worth of steps, then constant."""
    start = min(WARMUP_TEACHER_TEMPERATURE, final)
    warm = total_steps * min(WARMUP_EPOCHS, 0.3 * epochs) / epochs
    return final if step >= warm else start + (final - start) * step / warm


@register
class DINO(Method):
    """Student backbone + DINO head; an EMA teacher of both on the global crops; centred, sharpened targets."""

    name = "dino"
    Config = DINOConfig
    config: DINOConfig

    def __init__(self, backbone: nn.Module, config: DINOConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        c = self.config
        self.head = DINOHead(self.feature_dim, c.head_hidden, c.head_out, c.prototypes)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, c.prototypes))
        # the teacher temperature of the next step: set by after_step, kept for an exact resume
        self.register_buffer("teacher_temp", torch.tensor(min(WARMUP_TEACHER_TEMPERATURE, c.teacher_temperature)))

    @classmethod
    def recipe(cls, config: DINOConfig, aug: augment.Augment, image_size: int) -> augment.Recipe:
        """Multi-crop: 2 global views at the images' size, then the local crops."""
        return augment.multi_crop_recipe(aug, config.local_crops, min(config.local_size, image_size))

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's outputs of every crop, then the teacher's of the two global ones (no gradient)."""
        n = len(views[0])
        student = per_crop_size(lambda x: self.head(self.backbone(x)), views)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:2]))).split(n)
        return [*student, *teacher]

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        student = [distributed.gather(s) for s in embeddings[:-2]]  # the loss of the global batch, with gradients
        teacher = [distributed.gather(t.detach()) for t in embeddings[-2:]]
        with full_precision(student[0]):
            student = [s.float() for s in student]
            teacher = [t.float() for t in teacher]
            loss = dino_loss(student, teacher, self.center, self.config.temperature, self.teacher_temp)  # no sync
            with torch.no_grad():  # every process holds the same global teacher outputs: the same centre
                batch_center = torch.cat(teacher).mean(0, keepdim=True)
                self.center.mul_(CENTER_MOMENTUM).add_(batch_center, alpha=1 - CENTER_MOMENTUM)
        return loss

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, epochs: int) -> None:
        super().after_step(step, total_steps, epochs)  # official cosine_scheduler(base, 1), per iteration
        self.teacher_temp.fill_(teacher_temperature(self.config.teacher_temperature, step, total_steps, epochs))
