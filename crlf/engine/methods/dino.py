"""DINO (Caron et al. 2021): self-distillation with a momentum teacher, multi-crop, centring and sharpening.

The student (backbone + DINO head) sees every crop; the teacher, an EMA copy of the student that receives no
gradient, sees the two global crops. The loss is the cross-entropy between the teacher's centred, sharpened
softmax of one global crop and the student's softmax of every *other* crop, averaged over those pairs, as the
official ``DINOLoss``. Conventions (official code: facebookresearch/dino, main_dino.py):

- head: 3-layer MLP (GELU, no BatchNorm: ``use_bn_in_head`` False) to a bottleneck of ``--head-out`` (256), L2
  normalisation, then a weight-normalised linear layer without bias to K = ``--prototypes`` outputs whose norms
  are fixed at 1 (``norm_last_layer`` True). The MLP always has 3 layers (``--head-layers`` / ``--head-dropout``
  are SimCLR's head options). The official "freeze the last layer during the first epoch" is not done.
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

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.methods import Method, full_precision, multi_crop_views, per_crop_size, register
from crlf.engine.methods.teacher import ema_, frozen_copy, momentum_at
from crlf.settings import PretrainSettings

CENTER_MOMENTUM = 0.9  # official DINOLoss(center_momentum=0.9)
WARMUP_TEACHER_TEMPERATURE = 0.04  # official --warmup_teacher_temp
WARMUP_EPOCHS = 30  # official --warmup_teacher_temp_epochs (of 100 by default)


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalise -> weight-normalised linear (unit-norm rows) to K outputs."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
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


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_temp: float,
    teacher_temp: float | torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Mean over the pairs (teacher crop i, student crop j != i) of the batch-mean cross-entropy
    H(softmax((t_i - c) / teacher_temp), softmax(s_j / student_temp)); the teacher side carries no gradient."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    logs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(q * logs[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(len(logs)) if j != i]
    return torch.stack(terms).mean()


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
    defaults = {
        "head_hidden": 2048,
        "head_out": 256,  # the bottleneck
        "head_layers": 3,  # always 3 (shown by --print-config; the option does not apply)
        "prototypes": 4096,  # solo-learn's CIFAR value; official ImageNet 65536
        "temperature": 0.1,  # the student's
        "teacher_temperature": 0.07,
        "momentum": 0.996,
        "local_crops": 4,
        "local_size": 16,
    }

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__(backbone, feature_dim, settings)
        self.head = DINOHead(feature_dim, settings.head_hidden, settings.head_out, settings.prototypes)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, settings.prototypes))
        # the teacher temperature of the next step: set by after_step, kept for an exact resume
        self.register_buffer(
            "teacher_temp", torch.tensor(min(WARMUP_TEACHER_TEMPERATURE, settings.teacher_temperature))
        )
        self.student_temp = settings.temperature
        self.final_teacher_temp = settings.teacher_temperature
        self.base_momentum = settings.momentum
        self.epochs = settings.epochs

    def views(self, batch: torch.Tensor, settings: PretrainSettings, gen: torch.Generator) -> list[torch.Tensor]:
        return multi_crop_views(batch, settings, gen)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        n = len(views[0])
        student = per_crop_size(lambda x: self.head(self.backbone(x)), views)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:2]))).split(n)
        student = [distributed.gather(s) for s in student]  # the loss of the global batch, with gradients
        teacher = [distributed.gather(t) for t in teacher]
        with full_precision(student[0]):
            student = [s.float() for s in student]
            teacher = [t.float() for t in teacher]
            loss = dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temp)  # no host sync
            with torch.no_grad():  # every process holds the same global teacher outputs: the same centre
                batch_center = torch.cat(teacher).mean(0, keepdim=True)
                self.center.mul_(CENTER_MOMENTUM).add_(batch_center, alpha=1 - CENTER_MOMENTUM)
        return loss

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = momentum_at(step, total_steps, self.base_momentum)  # official cosine_scheduler(base, 1), per iteration
        ema_(self.teacher_backbone, self.backbone, m)
        ema_(self.teacher_head, self.head, m)
        self.teacher_temp.fill_(teacher_temperature(self.final_teacher_temp, step, total_steps, self.epochs))
