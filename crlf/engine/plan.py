"""A run's typed plan: everything the loop and the run directory need, as the command layer resolved it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlf.engine import augment
from crlf.engine.sources import DataSpec, ImageSet


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, as the command layer resolved it (crlf.commands.pretrain builds it from the settings;
    crlf.options documents each field): the method and its config, the backbone, the data, the augmentation and the
    optimisation; `values` is the resolved settings as config.json records them, `identity` the subset of them that
    --resume refuses to change."""

    method: str
    method_config: Any  # the method's Config dataclass
    augment: augment.Augment
    data: DataSpec
    out: Path
    arch: str = "resnet18"
    stem: str = "auto"
    patch_size: int | None = None
    init: str | None = None  # starting weights of the backbone (crlf.engine.weights)
    epochs: int = 100
    batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.48
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0
    layer_decay: float = 1.0  # ViT layer-wise lr decay (crlf.engine.optim.layer_scales)
    grad_clip: float = 0.0
    micro_batch: int = 0  # images per forward chunk (crlf.engine.gradcache); 0: the whole batch at once
    activation_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    compile: bool = False
    sync_bn: bool = False
    knn_every: int = 0
    k: int = 200
    knn_temperature: float = 0.1
    device: str = "auto"
    precision: str = "auto"
    logger: tuple[str, ...] = ()  # experiment trackers (crlf.engine.trackers)
    log_every_steps: int = 50  # the trackers' loss and lr every N steps (0: per epoch only)
    values: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    backbone: torch.nn.Module | None = None  # a user's own backbone instead of building `arch`
    images: ImageSet | None = None  # a user's own images instead of reading `data`
