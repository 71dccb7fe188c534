"""torchvision Vision Transformers at any image size and patch size."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from crlf.engine.backbones.base import BackboneSpec, CheckpointedBlocks, Family, checkpointed, register
from crlf.errors import InputError


def resized_positions(pos: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings (1, 1 + side^2, D) of a side x side patch grid for another grid: the class token's kept,
    the grid resized bicubically (as DINO does for its local crops)."""
    old = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], new.flatten(2).transpose(1, 2)], dim=1)


class _ViT(models.VisionTransformer):
    """torchvision's VisionTransformer (same parameter names) that also takes images of another size than it was
    built for, by interpolating the position embeddings (as DINO does for its local crops); the output is the class
    token after the final LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if h == w == self.image_size:
            return super().forward(x)
        if h % p or w % p:
            raise InputError(f"a ViT with {p} px patches takes sides that are multiples of {p}, got {h}x{w}: "
                             f"choose an --image-size that is a multiple of {p}")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, h/p * w/p, D)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        pos = resized_positions(self.encoder.pos_embedding, self.image_size // p, (h // p, w // p))
        enc = self.encoder
        out = enc.ln(enc.layers(enc.dropout(tokens + pos)))
        return self.heads(out[:, 0])

    def patch_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """The class token and the patch embeddings of `x` with their positions, (B, 1 + L, D), as forward builds
        them; patches where the bool `mask` (B, L) is set replaced by `mask_token` (D,) first (iBOT)."""
        n, _, h, w = x.shape
        p = self.patch_size
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        if mask is not None and mask_token is not None:
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        pos = self.encoder.pos_embedding
        if h != self.image_size or w != self.image_size:
            pos = resized_positions(pos, self.image_size // p, (h // p, w // p))
        return tokens + pos

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer and its final LayerNorm over any tokens (a subset of patch_tokens': MAE's visible ones);
        forward's features are the class token of its output."""
        enc = self.encoder
        return enc.ln(enc.layers(enc.dropout(tokens)))


@register
class ViTs(Family):
    """torchvision VisionTransformer in the DeiT widths, patch 4 for small images (CIFAR: 8 x 8 tokens), 8 up to
    95 px, 16 from 96 px; heads = Identity. Trained with AdamW by default (SGD and LARS are CNN recipes)."""

    name = "vit"
    # (layers, heads, width, MLP width)
    ARCHS: ClassVar[dict[str, tuple[int, int, int, int]]] = {
        "vit_tiny": (12, 3, 192, 768),
        "vit_small": (12, 6, 384, 1536),
        "vit_base": (12, 12, 768, 3072),
    }
    defaults = {"optimizer": "adamw"}

    def owns(self, arch: str) -> bool:
        return arch in self.ARCHS

    def spec(self, arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
        patch = patch_size or (4 if image_size <= 48 else 8 if image_size < 96 else 16)
        if image_size % patch:
            raise InputError(f"--arch {arch}: {patch} px patches do not tile {image_size} px images: choose an "
                             f"--image-size that is a multiple of {patch}, or a --patch-size that divides {image_size}")
        return BackboneSpec(arch, image_size, self.ARCHS[arch][2], patch_size=patch)

    def problem(self, spec: BackboneSpec) -> str | None:
        p = spec.patch_size
        if type(p) is not int or p < 1 or spec.image_size % p:
            return f"patch size {str(p)[:20]} does not tile {spec.image_size} px"
        if spec.feature_dim != self.ARCHS[spec.arch][2]:
            return f"feature_dim {spec.feature_dim} for a {spec.arch}, whose features have {self.ARCHS[spec.arch][2]}"
        return None

    def _args(self, spec: BackboneSpec) -> dict[str, int]:
        layers, heads, width, mlp = self.ARCHS[spec.arch]
        return dict(image_size=spec.image_size, patch_size=spec.patch_size or 16, num_layers=layers,
                    num_heads=heads, hidden_dim=width, mlp_dim=mlp)

    def build(self, spec: BackboneSpec) -> nn.Module:
        net = _ViT(**self._args(spec))
        net.heads = nn.Identity()
        return net

    def no_weight_decay(self, net: nn.Module) -> set[str]:
        return {"class_token", "encoder.pos_embedding"}

    def checkpoint_activations(self, net: nn.Module) -> None:
        checkpointed(net.encoder.layers, CheckpointedBlocks)

    def plain_code(self, spec: BackboneSpec) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._args(spec).items())
        return f"net = torchvision.models.VisionTransformer({args}); net.heads = torch.nn.Identity()"
