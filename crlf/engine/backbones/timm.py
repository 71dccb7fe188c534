"""Any timm model by plain name (offline: no hub access, no pretrained weights)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from crlf.engine.backbones.base import BackboneSpec, Family, register, width
from crlf.errors import InputError, short_reason


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise InputError('timm backbones need the timm package: pip install "crlf[timm]"') from None


# a timm model name as timm.list_models() gives them ('convnext_atto', 'vit_small_patch16_224.augreg_in21k'): no
# 'hf-hub:' / 'local-dir:' prefix, no path, so a name (one read from an encoder file too) reaches neither the network
# nor a folder
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")


def _timm_name_problem(arch: str) -> str | None:
    """What makes `arch` ('timm:NAME') other than a plain timm model name, or None."""
    name = arch.removeprefix("timm:")
    if _TIMM_NAME.fullmatch(name):
        return None
    return f"{arch[:60]!r} is not a plain timm model name (no hf-hub: or local-dir: source, no path)"


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode while timm builds a model: a plain name without pretrained weights needs no
    download, and should a timm version reach for the Hub anyway it fails at once instead of contacting it."""
    hub = sys.modules.get("huggingface_hub.constants")  # read HF_HUB_OFFLINE when it was imported (with timm)
    saved_env, saved_hub = os.environ.get("HF_HUB_OFFLINE"), getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if hub is not None:
            hub.HF_HUB_OFFLINE = saved_hub


def _create(arch: str, **kwargs: int) -> nn.Module:
    """timm.create_model for a plain `arch` name, feature output (num_classes=0), random weights, Hub offline."""
    problem = _timm_name_problem(arch)
    if problem:
        raise InputError(f"--arch: {problem}")
    timm = _timm()
    with _hub_offline():
        return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=0, **kwargs)


# what timm raises for a model it cannot build with these arguments (an image size too small, a bad combination)
_BUILD_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError)


@register
class Timm(Family):
    """Any timm model as ``timm:<name>`` (a plain model name), built with ``num_classes=0`` (features, no
    classifier) and never with pretrained weights; the feature width is the model's own. Models that take an image
    size (ViTs) get the run's."""

    name = "timm"
    arguments = frozenset({"img_size"})

    def owns(self, arch: str) -> bool:
        return arch.startswith("timm:")

    def check(self, arch: str) -> None:
        problem = _timm_name_problem(arch)
        if problem:
            raise InputError(f"--arch: {problem}; see timm.list_models()")
        timm, name = _timm(), arch.removeprefix("timm:")
        if not timm.is_model(name):
            close = timm.list_models(f"*{name[:6]}*")[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise InputError(f"--arch {arch}: timm {timm.__version__} has no model '{name}'{hint}; "
                             "see timm.list_models()")

    def spec(self, arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
        self.check(arch)
        kwargs = {"img_size": image_size}
        try:
            try:
                net = _create(arch, **kwargs)
            except TypeError:  # a model without an image size (CNNs)
                kwargs = {}
                net = _create(arch)
        except _BUILD_ERRORS as e:
            raise InputError(f"--arch {arch}: timm cannot build it for {image_size} px images "
                             f"({short_reason(e, 160)}): choose another --image-size or model") from None
        return BackboneSpec(arch, image_size, width(net, arch, image_size), kwargs=kwargs)

    def build(self, spec: BackboneSpec) -> nn.Module:
        try:
            return _create(spec.arch, **spec.kwargs)
        except _BUILD_ERRORS as e:
            raise InputError(f"timm cannot build {spec.arch} with {spec.kwargs} ({short_reason(e, 160)})") from None

    def problem(self, spec: BackboneSpec) -> str | None:
        problem = _timm_name_problem(spec.arch)
        if problem:
            return problem
        timm, name = _timm(), spec.arch.removeprefix("timm:")
        if not timm.is_model(name):
            return f"timm {timm.__version__} has no model {name!r} (pip install -U timm if the file is newer)"
        if spec.kwargs.get("img_size", spec.image_size) != spec.image_size:
            return f"timm img_size {spec.kwargs['img_size']} is not the image_size {spec.image_size}"
        return None

    def no_weight_decay(self, net: nn.Module) -> set[str]:
        # timm's own rule (timm.optim.param_groups_weight_decay): the names a model lists, and their sub-parameters
        named = set(getattr(net, "no_weight_decay", lambda: set())())
        return {n for n, _ in net.named_parameters() if n in named or n.split(".")[0] in named}

    def plain_code(self, spec: BackboneSpec) -> str:
        args = "".join(f", {k}={v}" for k, v in spec.kwargs.items())
        return f'net = timm.create_model("{spec.arch.removeprefix("timm:")}", num_classes=0{args})'
