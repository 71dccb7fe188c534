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

from crlf import catalog
from crlf.engine import augment, backbones, methods, sources, train
from crlf.settings import PretrainSettings, settings_values
from crlf.typed import config_of

log = logging.getLogger(__name__)

# the settings outside the method's config that define a run: --resume refuses to continue with other values
IDENTITY_KEYS = ("data", "data_dir", "split", "image_size", "limit", "arch", "stem", "patch_size", "batch_size",
                 "optimizer", "seed")  # fmt: skip


def identity_keys() -> tuple[str, ...]:
    """The settings that define a run: the fixed ones, the method's name and every method option marked identity."""
    options = catalog.methods()["options"]
    return (*IDENTITY_KEYS, "method", *(k for k, o in options.items() if o["identity"]))


def resolve(settings: PretrainSettings) -> PretrainSettings:
    """The settings with the chosen method's defaults for its options left unset (None), and the optimizer the
    backbone family (first) or the method chooses; a warning for each option set that the method does not have."""
    cls = methods.get(settings.method)
    backbones.check(settings.arch)  # an unknown or unavailable backbone fails before any data is read
    own = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    foreign = [k for k in catalog.methods()["options"] if k not in own and getattr(settings, k) is not None]
    for name in foreign:
        log.warning("--%s is not an option of --method %s: it is ignored", name.replace("_", "-"), settings.method)
    update = {k: v for k, v in own.items() if getattr(settings, k) is None}
    if settings.optimizer is None:
        update["optimizer"] = backbones.defaults(settings.arch).get("optimizer", cls.optimizer)
    return settings.model_copy(update=update) if update else settings


def train_config(settings: PretrainSettings, backbone: torch.nn.Module | None = None) -> train.TrainConfig:
    """The typed plan of a run from (resolved) settings."""
    cls = methods.get(settings.method)
    values = settings_values(settings)
    keys = set(identity_keys())
    return config_of(
        train.TrainConfig,
        settings,
        method_config=config_of(cls.Config, settings),
        augment=config_of(augment.Augment, settings),
        data=config_of(sources.DataSpec, settings) if hasattr(sources, "DataSpec") else settings,
        lr=settings.resolved_lr,
        weight_decay=settings.resolved_weight_decay,
        values=values,
        identity={k: v for k, v in values.items() if k in keys},
        backbone=backbone,
    )


def pretrain(
    settings: PretrainSettings,
    reporter: train.Reporter | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    hard_abort: bool = False,
) -> dict[str, Any]:
    """Train an encoder with the method `settings` name, writing the run directory; returns a summary dict.

    resume: continue from last.safetensors when there is one (a no-op when the run is complete);
    force: discard whatever run the directory holds and start over;
    hard_abort: a second SIGINT ends the process at once, even inside a long native op (the CLI's choice).
    """
    cfg = train_config(resolve(settings))
    return train.pretrain(cfg, reporter, resume=resume, force=force, hard_abort=hard_abort)
