"""Momentum teachers shared by the methods that keep one (moco, byol): a frozen copy, its EMA update and the
cosine schedule of the EMA momentum. Not a method itself (registers nothing)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (weights and buffers) whose parameters take no gradient, so the optimizer skips them and
    they live in the method's state_dict. Draws no random numbers."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """EMA momentum for the update after optimizer step `step` (from 1) of `total_steps`: BYOL's cosine increase
    tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2 with k = step - 1 and K = total_steps, so the first update uses
    `base` and the schedule reaches 1 at k = K (solo-learn's MomentumUpdater with final_tau 1)."""
    k = min(max(step - 1, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(1, total_steps)) + 1.0) / 2.0


@torch.no_grad()
def ema_(teacher: nn.Module, online: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * online, parameter by parameter (buffers such as BatchNorm's
    running statistics are the teacher's own, as in MoCo and solo-learn)."""
    t = [p for p in teacher.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):  # pragma: no cover - a construction error
        raise ValueError("teacher and online network differ in structure")
    torch._foreach_lerp_(t, o, 1.0 - momentum)
