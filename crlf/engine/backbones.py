"""Backbones: a registry of families (torchvision ResNets, torchvision ViTs, any timm model) behind one spec.

A ``BackboneSpec`` says everything needed to rebuild a backbone without crlf's settings: it travels in the
encoder file's metadata, so ``crlf.load_encoder`` (and plain torchvision / timm code) can rebuild any of them.
Every backbone maps (B, 3, H, W) images to (B, feature_dim) features with no classifier, and keeps its library's
own parameter names, so the weights load into the plain library model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from crlf.errors import InputError, short_reason
from crlf.limits import MAX_IMAGE_SIZE, MAX_WIDTH


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its arch name (resnet18, vit_small, timm:convnext_atto), the choices resolved for an image
    size (stem, patch size, timm's constructor arguments) and the width of its features."""

    arch: str
    image_size: int
    feature_dim: int
    stem: str | None = None  # resnets: cifar or imagenet
    patch_size: int | None = None  # vits
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm: extra constructor arguments (img_size)

    @property
    def family(self) -> Family:
        return family_of(self.arch)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        """Parse and check a spec from an encoder file (ValueError naming the problem: a file can be crafted)."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) - set(cls.__dataclass_fields__):
            raise ValueError(f"backbone spec {text[:80]!r} is not an object of known fields")
        spec = cls(**raw)
        if not isinstance(spec.arch, str) or not isinstance(spec.kwargs, dict):
            raise ValueError("backbone spec: arch must be a name and kwargs an object")
        if not any(f.owns(spec.arch) for f in FAMILIES):
            raise ValueError(f"unknown arch {spec.arch[:40]!r}, expected one of {', '.join(names())}, timm:NAME")
        extra = set(spec.kwargs) - spec.family.arguments
        if extra or not all(type(v) is int for v in spec.kwargs.values()):
            raise ValueError(f"unexpected {spec.family.name} arguments {str(spec.kwargs)[:60]}")
        for name, top in (("image_size", MAX_IMAGE_SIZE), ("feature_dim", MAX_WIDTH * 4)):
            value = getattr(spec, name)
            if type(value) is not int or not 1 <= value <= top:
                raise ValueError(f"{name} {str(value)[:20]} outside 1..{top}")
        problem = spec.family.problem(spec)
        if problem:
            raise ValueError(problem)
        return spec


class Family:
    """One kind of backbone. Subclasses say which arch names are theirs, resolve a spec, and build it."""

    name: ClassVar[str]
    # settings this family fills when the user and the method leave them unset (None), e.g. ViTs train with AdamW
    defaults: ClassVar[dict[str, Any]] = {}
    # the constructor arguments a spec read from a file may carry (int values): what crlf itself writes, no more
    arguments: ClassVar[frozenset[str]] = frozenset()

    def owns(self, arch: str) -> bool:
        raise NotImplementedError

    def check(self, arch: str) -> None:
        """Raise InputError when `arch` cannot be built here (a missing package, an unknown model name)."""

    def spec(self, arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
        raise NotImplementedError

    def build(self, spec: BackboneSpec) -> nn.Module:
        raise NotImplementedError

    def problem(self, spec: BackboneSpec) -> str | None:
        """What is wrong with a spec read from a file, or None."""
        return None

    def no_weight_decay(self, net: nn.Module) -> set[str]:
        """Names of parameters besides the 1-D ones (biases, norms) that are never decayed."""
        return set()

    def plain_code(self, spec: BackboneSpec) -> str:
        """Python that builds this backbone without crlf, ready for ``load_state_dict(load_file(path))``."""
        raise NotImplementedError


FAMILIES: list[Family] = []


def register(cls: type[Family]) -> type[Family]:
    FAMILIES.append(cls())
    return cls


def names() -> tuple[str, ...]:
    """The --arch names crlf builds itself, family by family (timm:NAME adds timm's): the one list of them."""
    return tuple(name for fam in FAMILIES for name in getattr(fam, "ARCHS", {}))  # custom and timm: not names


def family_of(arch: str) -> Family:
    for fam in FAMILIES:
        if fam.owns(arch):
            return fam
    raise InputError(f"unknown --arch '{arch}': choose one of {', '.join(names())} or timm:<model name>")


def spec_for(arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
    """Resolve the settings' backbone choices for images of `image_size` px into a spec (InputError when they do not
    fit, e.g. a patch size that does not divide the image)."""
    return family_of(arch).spec(arch, image_size, stem, patch_size)


def build(spec: BackboneSpec) -> nn.Module:
    """A freshly initialised backbone for `spec`."""
    return spec.family.build(spec)


def check(arch: str) -> None:
    """InputError now, before any data is read, when `arch` is unknown or needs a package that is missing."""
    family_of(arch).check(arch)


def defaults(arch: str) -> dict[str, Any]:
    """The settings a backbone family fills (before the method's): see Family.defaults."""
    return family_of(arch).defaults


def no_weight_decay(spec: BackboneSpec, net: nn.Module) -> set[str]:
    """Parameter names of `net` (the backbone) never decayed: every 1-D one and the family's own (position
    embeddings, class tokens)."""
    return {n for n, p in net.named_parameters() if p.ndim <= 1} | spec.family.no_weight_decay(net)


# --- ResNets -----------------------------------------------------------------------------------------------------
def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' -> 'cifar' for images of at most 64 px (a stride-2 stem would throw away most pixels), else 'imagenet'."""
    if stem != "auto":
        return stem
    return "cifar" if image_size <= 64 else "imagenet"


@register
class ResNets(Family):
    """torchvision ResNets without their classifier (fc = Identity); the CIFAR stem replaces conv1 by a 3x3 stride-1
    conv and drops the max-pool."""

    name = "resnet"
    ARCHS: ClassVar[dict[str, tuple[Any, int]]] = {
        "resnet18": (models.resnet18, 512),
        "resnet34": (models.resnet34, 512),
        "resnet50": (models.resnet50, 2048),
    }

    def owns(self, arch: str) -> bool:
        return arch in self.ARCHS

    def spec(self, arch: str, image_size: int, stem: str = "auto", patch_size: int | None = None) -> BackboneSpec:
        return BackboneSpec(arch, image_size, self.ARCHS[arch][1], stem=resolve_stem(stem, image_size))

    def problem(self, spec: BackboneSpec) -> str | None:
        if spec.stem not in ("cifar", "imagenet"):
            return f"unknown stem {str(spec.stem)[:40]!r}, expected cifar or imagenet"
        if spec.feature_dim != self.ARCHS[spec.arch][1]:
            return f"feature_dim {spec.feature_dim} for a {spec.arch}, whose features have {self.ARCHS[spec.arch][1]}"
        return None

    def build(self, spec: BackboneSpec) -> nn.Module:
        net = self.ARCHS[spec.arch][0](weights=None)
        if spec.stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return net

    def plain_code(self, spec: BackboneSpec) -> str:
        lines = [f"net = torchvision.models.{spec.arch}(num_classes=1); net.fc = torch.nn.Identity()"]
        if spec.stem == "cifar":
            lines.append("net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity()")
        return "\n".join(lines)


# --- Vision Transformers -----------------------------------------------------------------------------------------
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
        pos = self.encoder.pos_embedding
        side = self.image_size // p
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h // p, w // p), mode="bicubic", align_corners=False).to(pos.dtype)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        enc = self.encoder
        out = enc.ln(enc.layers(enc.dropout(tokens + pos)))
        return self.heads(out[:, 0])


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

    def plain_code(self, spec: BackboneSpec) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._args(spec).items())
        return f"net = torchvision.models.VisionTransformer({args}); net.heads = torch.nn.Identity()"


# --- timm ----------------------------------------------------------------------------------------------------------
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
        return BackboneSpec(arch, image_size, _width(net, arch, image_size), kwargs=kwargs)

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


# --- a user's own module ----------------------------------------------------------------------------------------------
CUSTOM = "custom"


@register
class Custom(Family):
    """Any nn.Module a Python user trains (crlf.pretrain(..., backbone=module)): crlf cannot rebuild it, so an
    encoder file of one records arch 'custom' and load_encoder asks for the module."""

    name = "custom"

    def owns(self, arch: str) -> bool:
        return arch == CUSTOM

    def check(self, arch: str) -> None:
        raise InputError("--arch custom is a module of your own: pass it from Python, "
                         "crlf.pretrain(settings, backbone=module)")  # fmt: skip

    def build(self, spec: BackboneSpec) -> nn.Module:
        raise InputError("this encoder's backbone is a module of your own, which crlf cannot rebuild: load it with "
                         "crlf.load_encoder(path, backbone=YourModule())")  # fmt: skip

    def plain_code(self, spec: BackboneSpec) -> str:
        return "backbone = YourModule()  # the module the encoder was trained with"


def custom_spec(net: nn.Module, image_size: int) -> BackboneSpec:
    """The spec of a user's own backbone: its feature width read off one forward pass at `image_size` px."""
    was = net.training
    try:
        return BackboneSpec(CUSTOM, image_size, int(_width(net, "custom", image_size)))
    finally:
        net.train(was)


def _width(net: nn.Module, arch: str, image_size: int) -> int:
    """A timm model's feature width, read off one forward pass of a blank image at the run's size (which also finds
    models too deep for small images before any data is loaded)."""
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise InputError(f"--arch {arch} cannot take {image_size} px images ({short_reason(e, 160)}): "
                         "choose a larger --image-size or another model") from None
    if out.ndim != 2:
        raise InputError(f"--arch {arch} gives features of shape {tuple(out.shape[1:])}, not a vector: choose a "
                         "model that pools its features")
    return out.shape[1]


def describe(spec: BackboneSpec) -> str:
    """A short text for logs: 'resnet18 (cifar stem)', 'vit_small (patch 4)', 'timm:convnext_atto'."""
    if spec.stem:
        return f"{spec.arch} ({spec.stem} stem)"
    if spec.patch_size:
        return f"{spec.arch} (patch {spec.patch_size}, {(spec.image_size // spec.patch_size) ** 2} tokens)"
    return spec.arch
