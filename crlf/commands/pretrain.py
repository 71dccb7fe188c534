"""``crlf pretrain`` / ``crlf.pretrain``: the settings -> the method's config, the typed TrainConfig -> the loop.

The one place where "None means the method's default" is resolved: the chosen method's config dataclass holds its
defaults, a backbone family may choose the optimizer (ViTs: AdamW), and what the run uses is what config.json
records and --print-config shows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from PIL import Image

from crlf import catalog
from crlf.engine import augment, backbones, methods, sources, train
from crlf.engine.encoder import to_batch
from crlf.engine.plan import TrainConfig
from crlf.engine.sources.base import resize
from crlf.errors import InputError
from crlf.settings import PretrainSettings, settings_values
from crlf.typed import config_of

log = logging.getLogger(__name__)

# the settings outside the method's config that define a run: --resume refuses to continue with other values
IDENTITY_KEYS = ("data", "data_dir", "split", "image_size", "limit", "arch", "stem", "patch_size", "init",
                 "batch_size", "optimizer", "layer_decay", "seed")  # fmt: skip


def identity_keys() -> tuple[str, ...]:
    """The settings that define a run: the fixed ones, the method's name and every method option marked identity."""
    options = catalog.methods()["options"]
    return (*IDENTITY_KEYS, "method", *(k for k, o in options.items() if o["identity"]))


def resolve(settings: PretrainSettings, custom_backbone: bool = False) -> PretrainSettings:
    """The settings with the chosen method's defaults for its options left unset (None), the optimizer the
    backbone family (first) or the method chooses, the method's own Adam(W) lr where it has one; a warning for each
    option set that the method does not have."""
    cls = methods.get(settings.method)
    if not custom_backbone:
        backbones.check(settings.arch)  # an unknown or unavailable backbone fails before any data is read
    own = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    foreign = [k for k in catalog.methods()["options"] if k not in own and getattr(settings, k) is not None]
    for name in foreign:
        log.warning("--%s is not an option of --method %s: it is ignored", name.replace("_", "-"), settings.method)
    update = {k: v for k, v in own.items() if getattr(settings, k) is None}
    if settings.optimizer is None:
        family = {} if custom_backbone else backbones.defaults(settings.arch)
        update["optimizer"] = family.get("optimizer", cls.optimizer)
    adam = update.get("optimizer", settings.optimizer) in ("adam", "adamw")
    if settings.lr is None and cls.adam_lr is not None and adam:  # the method's recipe has its own (MAE)
        update["lr"] = cls.adam_lr * settings.batch_size / 256
    return settings.model_copy(update=update) if update else settings


def train_config(
    settings: PretrainSettings, backbone: torch.nn.Module | None = None, images: sources.ImageSet | None = None
) -> TrainConfig:
    """The typed plan of a run from (resolved) settings; a user's own backbone or images replace `arch` / `data`
    (config.json then says 'custom' / the kind of data)."""
    cls = methods.get(settings.method)
    values = settings_values(settings)
    if backbone is not None:
        values.update(arch=backbones.CUSTOM, stem=None, patch_size=None)
    if images is not None:
        values.update(data=images.source, data_dir=None, split=None, image_size=images.images.shape[-1])
    keys = set(identity_keys())
    return config_of(
        TrainConfig,
        settings,
        method_config=config_of(cls.Config, settings),
        augment=config_of(augment.Augment, settings),
        data=config_of(sources.DataSpec, settings),
        lr=settings.resolved_lr,
        weight_decay=settings.resolved_weight_decay,
        values=values,
        identity={k: v for k, v in values.items() if k in keys},
        backbone=backbone,
        images=images,
        logger=tuple(dict.fromkeys(settings.logger)),
    )


def image_set(data: Any, image_size: int | None) -> sources.ImageSet:
    """A user's images as an ImageSet: a uint8 tensor (N, 3, H, W), or a torch Dataset whose items are images (PIL,
    uint8 CHW tensors) or (image, label) pairs; square images of `image_size` px (default: the first image's side)."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.ndim != 4 or data.shape[1] != 3:
            raise InputError(f"data: a tensor must be uint8 (N, 3, H, W), got {data.dtype} {tuple(data.shape)}")
        images, labels, source = data, None, "tensor"
    else:
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError:
            raise InputError("data: give a uint8 tensor (N, 3, H, W) or a torch Dataset of images") from None
        pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
        for i, (image, _) in enumerate(pairs):
            tensor = isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3
            if not (tensor or isinstance(image, Image.Image)):
                raise InputError(f"data: item {i} is a {type(image).__name__}: the Dataset must give PIL "
                                 "images or uint8 (3, H, W) tensors, alone or with an integer label")  # fmt: skip
        if not pairs:
            raise InputError("data: the Dataset is empty")
        first = pairs[0][0]
        side = image_size or (min(first.size) if isinstance(first, Image.Image) else min(first.shape[-2:]))
        images = to_batch([image for image, _ in pairs], side)  # decoded and squared as embed() and extract do
        given = [label for _, label in pairs]
        labels = torch.tensor(given) if all(isinstance(v, int) for v in given) else None
        source = "dataset"
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        images = resize(images, image_size)
    names = [str(i) for i in range(int(labels.max()) + 1)] if labels is not None else []
    return sources.ImageSet(images.contiguous(), labels, names, [str(i) for i in range(len(images))], source)


def pretrain(
    settings: PretrainSettings | None = None,
    reporter: train.Reporter | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    hard_abort: bool = False,
    backbone: torch.nn.Module | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Train an encoder with the method `settings` name, writing the run directory; returns a summary dict.

    backbone: a module of your own instead of --arch (its width is read off one forward pass);
    data: your own images instead of --data: a uint8 tensor (N, 3, H, W) or a torch Dataset (see image_set);
    resume: continue from last.safetensors when there is one (a no-op when the run is complete);
    force: discard whatever run the directory holds and start over;
    hard_abort: a second SIGINT ends the process at once, even inside a long native op (the CLI's choice).
    """
    settings = settings if settings is not None else PretrainSettings()
    images = image_set(data, settings.image_size) if data is not None else None
    cfg = train_config(resolve(settings, custom_backbone=backbone is not None), backbone, images)
    return train.pretrain(cfg, reporter, resume=resume, force=force, hard_abort=hard_abort)
