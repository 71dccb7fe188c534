"""Self-supervised methods behind one interface, and their registry: a new method is one module here.

A method is an ``nn.Module`` that owns everything it trains or keeps besides the backbone: projection heads,
predictors, momentum teachers, queues, centres. The training loop is method-agnostic:

    views = method.views(batch, settings, generator)   # float views in [0, 1]: its own recipe (2 or multi-crop)
    loss = method([normalise(v) for v in views])        # the loss of the global batch (gathers across processes)
    loss.backward(); optimizer.step()
    method.after_step(step, total_steps)                # teachers, queues, centres: after the optimizer step

``method.backbone`` is the encoder that extract, the evaluations and the kNN monitor use. Everything the method
keeps lives in its ``state_dict`` (parameters and buffers), so checkpoints and exact resume need nothing more.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from crlf.engine import augment, backbones, distributed
from crlf.errors import InputError
from crlf.settings import PretrainSettings

REGISTRY: dict[str, type[Method]] = {}
_COMMON_DEFAULTS = {"head_layers": 2, "optimizer": "sgd"}  # for the methods that do not set their own


class Method(nn.Module):
    """The interface every method implements (see the module docstring)."""

    name: ClassVar[str]
    # values for the settings the user left unset (None), tuned for small images; e.g. head sizes, temperature
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: PretrainSettings):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def views(
        self, batch: torch.Tensor | augment.Crops, settings: PretrainSettings, gen: torch.Generator
    ) -> list[torch.Tensor]:
        """The augmented views of a uint8 batch (B, 3, H, W), or of views a streaming source already cut
        (augment.Crops), as float in [0, 1]; default: two SimCLR views."""
        return list(augment.views(batch, settings, gen))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - the interface
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (`step` counts from 1): momentum teachers, queues, centres."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``--method NAME``."""
    REGISTRY[cls.name] = cls
    return cls


def resolve(settings: PretrainSettings) -> PretrainSettings:
    """The settings with every value left unset (None) filled from the backbone family's defaults, then the
    method's: what the run uses, what config.json records and what --print-config shows."""
    cls = REGISTRY.get(settings.method)
    if cls is None:
        raise InputError(f"--method {settings.method} is not available in this version of crlf: "
                         f"choose one of {', '.join(sorted(REGISTRY))}")
    backbones.check(settings.arch)  # an unknown or unavailable backbone fails before any data is read
    chosen = {**_COMMON_DEFAULTS, **cls.defaults, **backbones.defaults(settings.arch)}  # ViTs: AdamW
    unset = {k: v for k, v in chosen.items() if getattr(settings, k) is None}
    return settings.model_copy(update=unset) if unset else settings


def build(settings: PretrainSettings, backbone: nn.Module, feature_dim: int) -> Method:
    """The method named by the (resolved) settings around a freshly built backbone."""
    settings = resolve(settings)
    return REGISTRY[settings.method](backbone, feature_dim, settings)


def pair(net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`net` over both views in one pass, each half gathered over every process with its gradients: the outputs
    of the global batch, view by view."""
    z1, z2 = net(torch.cat(views)).chunk(2)  # (B, D) each
    return distributed.gather(z1), distributed.gather(z2)


def per_crop_size(net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """`net` over every view, one batched pass per run of same-size views (the global crops, then the local ones,
    as the official MultiCropWrapper does); one output per view, not yet gathered."""
    runs: list[list[torch.Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape[-2:] == v.shape[-2:]:
            runs[-1].append(v)
        else:
            runs.append([v])
    return [out for run in runs for out in net(torch.cat(run)).split(len(views[0]))]


def multi_crop_views(
    batch: torch.Tensor | augment.Crops, settings: PretrainSettings, gen: torch.Generator
) -> list[torch.Tensor]:
    """The multi-crop recipe (DINO, SwAV): 2 global views at the images' size, then `local_crops` small ones."""
    size = min(batch.shape[-2:])
    return augment.multi_crop(batch, settings, gen, size, settings.local_crops, min(settings.local_size, size))


def recipe(settings: PretrainSettings) -> Callable[[augment.Crops, torch.Generator], list[torch.Tensor]]:
    """The (resolved) method's augmentation as a picklable function of (pre-cut views, generator): what a streaming
    source's worker processes run on a CPU. The recipes (``views``) use no state of the method, only the settings."""
    return functools.partial(_views, REGISTRY[settings.method], settings)


def _views(
    cls: type[Method], settings: PretrainSettings, batch: augment.Crops, gen: torch.Generator
) -> list[torch.Tensor]:
    return cls.views(None, batch, settings, gen)  # type: ignore[arg-type]


def crop_plan(settings: PretrainSettings, size: int) -> list[tuple[int, float, float]]:
    """The views the (resolved) method's recipe makes of `size`-pixel images, as (side, min area, max area) each:
    what a streaming source cuts from the full-resolution images while decoding (then augment.Crops)."""
    plan = [(size, settings.crop_min_scale, settings.crop_max_scale)] * 2
    if "local_crops" in REGISTRY[settings.method].defaults and settings.local_crops:  # multi-crop: dino, swav
        plan += [(min(settings.local_size, size), *augment.LOCAL_SCALE)] * settings.local_crops
    return plan


@contextlib.contextmanager
def full_precision(like: torch.Tensor) -> Iterator[None]:
    """Losses in float32 even inside the step's bf16 autocast (softmaxes over large similarity matrices)."""
    with torch.autocast(device_type=like.device.type, enabled=False):
        yield


# the methods register themselves on import (after the base class they build on)
from crlf.engine.methods import barlow, byol, dino, moco, simclr, simsiam, swav, vicreg  # noqa: E402,F401
