"""iBOT (Zhou et al. 2022, image BERT pre-training with an online tokenizer): DINO on the class tokens plus a
masked-patch self-distillation on the patch tokens of the two global crops.

Everything DINO does holds (methods/dino.py: the head, the EMA teacher, the centre, the teacher temperature, the
multi-crop recipe); iBOT adds (official code: bytedance/ibot, main_ibot.py ``iBOTLoss`` and loader.py
``ImageFolderMask``):

- masking: per global crop of each image, ``--mask-ratio`` (0.3: the official ``--pred_ratio`` default, with
  ``--pred_ratio_var`` 0) of its patches, chosen at random (mae.random_masking; the official default shape is
  blocks, not reproduced), drawn from the run's augmentation generator (``Method.set_generator``) as one draw of
  2 N rows, row 2 i + v for image i's crop v, so a seed gives the same masks and --resume continues them.
- student: the global crops with the masked patches' embeddings replaced by a learned mask token (zeros at first,
  the official ``masked_embed``) before the positions are added; the local crops unmasked, class token only.
- teacher: the EMA ViT on the unmasked global crops (the mask token is the student's alone).
- head: DINO's head on the class token and on every patch token (the official ``--shared_head`` True that the
  published recipes use), so the patch outputs have ``--prototypes`` dimensions.
- loss: dino_loss on the class tokens (the student's of the masked global crops and of the local ones) plus
  ``--patch-weight`` (official ``lambda2``, 1) x loss.masked_patch_loss at the masked positions of each global crop,
  against the teacher's patches of the same crop, centred by a separate patch centre (EMA 0.9 of the mean teacher
  patch output over the patches and the global batch, updated once per step after the loss used the old one, the
  official ``center2``) and sharpened by DINO's teacher temperature (the official patch temperature's schedule,
  0.04 to 0.07 over 30 epochs, is DINO's default here; the official class-token one ends at 0.04).
- optimizer: AdamW at 5e-4 x batch / 256 (the official ``--lr``); the official weight-decay schedule 0.04 to 0.4
  and the frozen last layer of the first epoch are not done.

``--micro-batch`` is refused: gradient caching replays torch's random state for each chunk, not the run's
generator the masks come from (as for mae).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crlf.engine import distributed
from crlf.engine.backbones.tokens import tokens_of
from crlf.engine.loss import masked_patch_loss
from crlf.engine.methods.base import full_precision, opt, per_crop_size, register
from crlf.engine.methods.dino import CENTER_MOMENTUM, DINO, DINOConfig
from crlf.engine.methods.mae import random_masking, vit_tokens


@dataclass(frozen=True)
class IBOTConfig(DINOConfig):
    """DINO's options, the masking ratio and the patch loss's weight."""

    mask_ratio: float = 0.3
    patch_weight: float = opt(1.0, "Weight of iBOT's masked-patch loss (lambda2).", ge=0.0, le=100.0)


@register
class IBOT(DINO):
    """DINO on the class tokens + masked-patch distillation of the teacher's patch tokens (ViTs only)."""

    name = "ibot"
    Config = IBOTConfig
    config: IBOTConfig
    optimizer = "adamw"
    adam_lr = 5e-4  # per 256 images: the official --lr

    def __init__(self, backbone: nn.Module, config: IBOTConfig | None = None, feature_dim: int | None = None):
        tokens = vit_tokens(backbone, self.name)  # before any work: a CNN is a one-line error
        super().__init__(backbone, config, feature_dim)
        self.tokens, self.teacher_tokens = tokens, tokens_of(self.teacher_backbone)
        self.mask_token = nn.Parameter(torch.zeros(tokens.width))
        self.register_buffer("patch_center", torch.zeros(1, self.config.prototypes))

    @classmethod
    def splits(cls) -> bool:
        """No: the masks come from the run's generator, which gradient caching's chunk replay does not restore."""
        return False

    def masks(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The masks (N, L) bool of the two global crops, True where the student sees the mask token."""
        n, p = len(views[0]), self.tokens.patch
        patches = (views[0].shape[-2] // p) * (views[0].shape[-1] // p)
        _, mask = random_masking(2 * n, patches, self.config.mask_ratio, self.generator, views[0].device)
        return list(mask.view(n, 2, patches).unbind(1))

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's class outputs of every crop, its patch outputs of the masked global crops, the teacher's
        class and patch outputs of the unmasked ones (no gradient), then the two masks (as 0 / 1)."""
        n, t, tt = len(views[0]), self.tokens, self.teacher_tokens
        masks = self.masks(views)
        glob = torch.cat(views[:2])
        out = t.encode(t.embed(glob, torch.cat(masks), self.mask_token))
        student_cls = self.head(t.features(out)).split(n)
        student_patch = self.head(out[:, t.prefix:]).split(n)
        local = per_crop_size(lambda x: self.head(self.backbone(x)), views[2:]) if len(views) > 2 else []
        with torch.no_grad():
            out = tt.encode(tt.embed(glob, None, None))
            teacher_cls = self.teacher_head(tt.features(out)).split(n)
            teacher_patch = self.teacher_head(out[:, tt.prefix:]).split(n)
        return [*student_cls, *local, *student_patch, *teacher_cls, *teacher_patch, *(m.float() for m in masks)]

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        crops = len(embeddings) - 8
        student_cls, rest = embeddings[:crops], embeddings[crops:]
        student_patch, teacher_cls, teacher_patch, masks = rest[0:2], rest[2:4], rest[4:6], rest[6:8]
        cls_loss = super().objective([*student_cls, *teacher_cls])  # DINO's loss and centre, on the global batch
        with full_precision(student_patch[0]):
            per_image = masked_patch_loss([s.float() for s in student_patch], [t.float() for t in teacher_patch],
                                          masks, self.patch_center, self.config.temperature, self.teacher_temp,
                                          reduction="none")  # fmt: skip
            with torch.no_grad():  # the mean over patches, then over the global batch's images and both crops
                means = distributed.gather(torch.cat([t.detach().float().mean(1) for t in teacher_patch]))
                self.patch_center.mul_(CENTER_MOMENTUM).add_(means.mean(0, keepdim=True), alpha=1 - CENTER_MOMENTUM)
        return cls_loss + self.config.patch_weight * distributed.gather(per_image).mean()
