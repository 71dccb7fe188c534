"""Distillation from a frozen teacher encoder: the student (the run's backbone, any --init) learns to match the
teacher's features of each view through a linear projection.

The recipe follows lightly-train's ``distillation`` (v2): a linear head from the student's features to the teacher's
width (truncated-normal init, std 0.02), the teacher frozen in eval mode under no_grad, LARS. Here the features are
the pooled global ones (lightly-train v2 matches patch tokens of a DINOv2 ViT; crlf's backbones give vectors) and
the loss is the normalised MSE 2 - 2 cos(student, teacher) per image (BYOL's regression loss), averaged over the
two views of the pair recipe, without mixup. ``--teacher-queue N`` switches to lightly-train's v1 loss instead: the
KL divergence between the softmaxes (temperature 0.07) of the student's and the teacher's similarities to a queue of
the last N teacher features (lightly-train sizes it at about 25-50% of the data set: 512 for 2,000 images, 2048 for
10,000, 8192 above 20,000). ``--ssl-weight w`` adds w x SimCLR's NT-Xent (head 2048 / 128,
``--temperature``, 0.2) on the student's own features: distillation combined with self-supervision. The teacher
sees each view at its own image size and normalisation (the views are un-normalised with the run's statistics,
resized, normalised with the teacher's).

The teacher is not part of the state dict beyond the SHA-256 of its file (``teacher_sha256``, a buffer): a resume
re-reads it and refuses a file that changed since the run started.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import distributed
from crlf.engine.encoder import prepare
from crlf.engine.heads import build_head
from crlf.engine.loss import nt_xent, queue_kl, regression_loss
from crlf.engine.methods.base import Method, full_precision, opt, register
from crlf.engine.queue import MemoryBank
from crlf.engine.weights import open_encoder, resolve
from crlf.errors import InputError


@dataclass(frozen=True)
class DistillConfig:
    """Distillation's options: the teacher (required): a crlf encoder or run directory, public timm weights, or a
    weights file with its arch."""

    teacher: str = opt("", "The teacher: a crlf encoder or run directory, or timm:NAME (local cache).", identity=True)
    teacher_arch: str = opt("", "The teacher's arch, for a plain weights file.", identity=True)
    ssl_weight: float = opt(0.0, "Plus this times SimCLR's NT-Xent on the student (0: off).",
                            identity=True, ge=0.0, le=100.0)  # fmt: skip
    teacher_queue: int = opt(0, "Queue N teacher features: lightly-train v1's KL loss (0: 2-2cos).", identity=True,
                             ge=0, le=1_048_576)  # fmt: skip
    temperature: float = 0.2  # of that NT-Xent
    queue_temperature: float = opt(0.07, "The queue KL's temperature (lightly-train's).", gt=0.0, le=100.0)


def _sha_tensor(hexdigest: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8)


@register
class Distill(Method):
    """Frozen teacher encoder; the student's features, linearly projected, regress the teacher's (2 - 2 cos)."""

    name = "distill"
    Config = DistillConfig
    config: DistillConfig
    optimizer = "lars"  # lightly-train's choice for its distillation

    teacher_sha256: torch.Tensor

    def __init__(self, backbone: nn.Module, config: DistillConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        if not self.config.teacher:
            raise InputError("--method distill needs --teacher: a crlf encoder.safetensors or run directory, "
                             "timm:NAME, or a weights file with --teacher-arch")
        source = self.config.teacher
        if not source.startswith("timm:"):
            source = str(resolve(source, "--teacher"))  # a run directory: its encoder
        arch = self.config.teacher_arch or None
        teacher = open_encoder(source, torch.device("cpu"), arch, arch_flag="--teacher-arch")
        for p in teacher.backbone.parameters():
            p.requires_grad_(False)
        self._teacher = [teacher]  # a list: not a submodule, so neither saved nor trained nor moved by .to()
        self.teacher_dim = teacher.spec.feature_dim
        self.head = nn.Linear(self.feature_dim, self.teacher_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # with ssl_weight: SimCLR's head and loss on the student besides (the head exists only then)
        self.ssl_head = build_head(self.feature_dim, 2048, 128) if self.config.ssl_weight > 0 else None
        # with teacher_queue: past teacher features, the pseudo classifier of lightly-train's v1 loss
        self.queue = MemoryBank(self.config.teacher_queue, self.teacher_dim) if self.config.teacher_queue else None
        self.register_buffer("teacher_sha256", _sha_tensor(teacher.sha256 or hashlib.sha256(b"").hexdigest()))
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1), persistent=False)  # the run's normalisation
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_mean", torch.tensor(teacher.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_std", torch.tensor(teacher.std).view(1, 3, 1, 1), persistent=False)

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The statistics the views were normalised with, so that the teacher sees the pixels."""
        self.input_mean.copy_(mean.reshape(1, 3, 1, 1))
        self.input_std.copy_(std.reshape(1, 3, 1, 1))

    @torch.no_grad()
    def teacher_features(self, views: torch.Tensor) -> torch.Tensor:
        """The teacher's features of normalised views (B, 3, H, W): at its image size and with its statistics."""
        teacher = self._teacher[0]
        if next(teacher.backbone.parameters()).device != views.device:
            teacher.backbone.to(views.device)
        x = views * self.input_std + self.input_mean  # back to [0, 1] pixels
        size = teacher.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return teacher.backbone.eval()(prepare(x, self.teacher_mean, self.teacher_std))  # device constants: no sync

    @property
    def per_image_loss(self) -> bool:  # type: ignore[override]
        """Without the NT-Xent term and the queue (which a whole batch joins at once) the loss is a mean over images:
        --micro-batch accumulates its chunks; else gradient caching."""
        return self.ssl_head is None and self.queue is None

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per view: the projected student features, the teacher's (no gradient), and SimCLR's projections."""
        x = torch.cat(views[:2])
        features = self.backbone(x)
        out = [*self.head(features).chunk(2), *self.teacher_features(x).chunk(2)]
        return out + (list(self.ssl_head(features).chunk(2)) if self.ssl_head is not None else [])

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        p = torch.cat([distributed.gather(e) for e in embeddings[:2]])
        t = torch.cat([distributed.gather(e.detach()) for e in embeddings[2:4]])
        with full_precision(p):
            if self.queue is None:
                loss = regression_loss(p.float(), t.float())
            else:  # the batch's teacher features join the queue first (as lightly-train's v1)
                t = F.normalize(t.float(), dim=1)
                self.queue.enqueue(t.unsqueeze(0))
                queue = self.queue.bank[0].clone()
                loss = queue_kl(F.normalize(p.float(), dim=1), t, queue, self.config.queue_temperature)
        if self.ssl_head is not None:
            z1, z2 = (distributed.gather(z) for z in embeddings[4:])
            with full_precision(z1):
                loss = loss + self.config.ssl_weight * nt_xent(z1, z2, self.config.temperature)
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved = state_dict.get(prefix + "teacher_sha256")
        if saved is not None and not torch.equal(saved.to(self.teacher_sha256.device), self.teacher_sha256):
            raise InputError(f"the teacher {self.config.teacher} is not the file this run started with (its SHA-256 "
                             "changed): restore that file, or use --force to start over")  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
