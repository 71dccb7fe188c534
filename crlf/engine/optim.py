"""Optimizers (SGD, LARS, Adam) and the learning-rate schedules, as small pure pieces."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from crlf.errors import InputError


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as SimCLR uses it: SGD with momentum whose step for each
    weight matrix is scaled by trust * ||w|| / ||grad + wd * w||; biases and norm parameters (1-D) are neither
    adapted nor decayed. The ratio stays on the device (torch.where), so a step never synchronises with the host.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1 and group.get("adapt", True):  # weight matrices / conv kernels: decay and adapt
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["trust"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(ratio)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return None


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, no_decay: set[str] = frozenset(),
    layer_decay: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """sgd (momentum 0.9, nesterov off), lars, adam or adamw. Parameters named in `no_decay` and every 1-D one
    (biases, norms) get no weight decay (and no LARS adaptation): position embeddings and class tokens are not
    weights to shrink. A momentum teacher's frozen parameters are left out. `layer_decay` < 1: a ViT backbone's
    groups carry an ``lr_scale`` (layer_scales) that the loop multiplies the scheduled lr with. `betas`: Adam's and
    AdamW's."""
    scales = layer_scales(model, layer_decay) if layer_decay != 1.0 else {}
    decay: dict[float, list[nn.Parameter]] = {}
    keep: dict[float, list[nn.Parameter]] = {}
    if not scales:  # the two groups, always (a checkpoint's param_groups are compared on resume)
        decay[1.0], keep[1.0] = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (keep if p.ndim <= 1 or n in no_decay else decay).setdefault(scales.get(n, 1.0), []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay, **_scaled(k)} for k, ps in sorted(decay.items())]
    groups += [{"params": ps, "weight_decay": 0.0, "adapt": False, **_scaled(k)} for k, ps in sorted(keep.items())]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "lars":
        return LARS(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer '{name}': choose sgd, lars, adam or adamw")


def _scaled(scale: float) -> dict[str, float]:
    return {} if scale == 1.0 else {"lr_scale": scale}


# a ViT's blocks (timm: blocks.N., torchvision: encoder.layers.encoder_layer_N.) and its embeddings (layer 0)
_BLOCK = re.compile(r"\.(?:blocks|layers)\.(?:encoder_layer_)?(\d+)\.")
_EMBED = re.compile(r"\.(conv_proj|class_token|pos_embedding|patch_embed|cls_token|pos_embed|reg_token|mask_token)")


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise lr decay of a ViT backbone (BEiT; DINOv2's ``layerwise_decay`` 0.9, as lightly-train's DINOv2):
    block i of L gets decay^(L + 1 - i), the embeddings decay^(L + 1), the final norm and every head 1. Keys are
    `model`'s parameter names; an InputError for a backbone without ViT blocks."""
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    blocks = {n: int(m.group(1)) + 1 for n in names if (m := _BLOCK.search(n))}
    if not blocks:
        raise InputError("--layer-decay is for ViT backbones (blocks of a transformer); this backbone has none: "
                         "drop --layer-decay")
    top = max(blocks.values()) + 1
    return {n: decay ** (top - blocks.get(n, 0 if _EMBED.search(n) else top)) for n in names}


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Learning rate at `step` (0-based): linear warm-up to `peak`, then cosine decay to 0 ('cosine') or flat."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule != "cosine":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Plateau:
    """ReduceLROnPlateau on the epoch loss (the seeds' schedule): halve the lr after `patience` epochs without a
    relative improvement of `threshold`. Its state is a few numbers, saved as JSON in the checkpoint."""

    factor: float = 0.5
    patience: int = 5
    threshold: float = 1e-4
    best: float = math.inf
    bad_epochs: int = 0
    scale: float = 1.0

    def update(self, loss: float) -> float:
        """Record an epoch's loss; returns the lr multiplier for the next epoch."""
        if loss < self.best * (1.0 - self.threshold):
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.scale *= self.factor
                self.bad_epochs = 0
        return self.scale

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any) -> Plateau:
        """The schedule saved by state(); ValueError for anything else (a state file can be crafted)."""
        names = {f.name for f in fields(cls)}
        numbers = isinstance(state, dict) and all(type(v) in (int, float) for v in state.values())
        if not numbers or set(state) != names:
            raise ValueError(f"the plateau schedule's state {str(state)[:40]} is not crlf's")
        return cls(**state)
