"""Backbones: the spec, the Family interface and the registry of families (one module each beside this).

A ``BackboneSpec`` says everything needed to rebuild a backbone without crlf's settings: it travels in the
encoder file's metadata, so ``crlf.load_encoder`` (and plain torchvision / timm code) can rebuild any of them.
Every backbone maps (B, 3, H, W) images to (B, feature_dim) features with no classifier, and keeps its library's
own parameter names, so the weights load into the plain library model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    def checkpoint_activations(self, net: nn.Module) -> None:
        """Recompute `net`'s activations in the backward pass (--activation-checkpointing): a model's own
        ``set_grad_checkpointing`` (timm's interface), else an InputError."""
        setter = getattr(net, "set_grad_checkpointing", None)
        try:
            if setter is None:
                raise NotImplementedError
            setter(True)
        except (NotImplementedError, AssertionError, TypeError):
            raise InputError(f"--activation-checkpointing: this {self.name} backbone has no set_grad_checkpointing: "
                             "drop the flag or use --micro-batch") from None


class CheckpointedStage(nn.Sequential):
    """A Sequential run under activation checkpointing as one piece (a ResNet stage): only its input is kept, the
    rest recomputed in backward with the random state replayed (use_reentrant=False). Parameter names unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return checkpoint(super().forward, x, use_reentrant=False, preserve_rng_state=True)


class CheckpointedBlocks(nn.Sequential):
    """A Sequential whose children are checkpointed one by one (a ViT's blocks), as CheckpointedStage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True) if torch.is_grad_enabled() \
                else block(x)  # fmt: skip
        return x


def checkpointed(seq: nn.Module, kind: type[nn.Sequential]) -> None:
    """Turn a plain nn.Sequential into `kind` in place (same children, names and state)."""
    if type(seq) is not nn.Sequential:  # pragma: no cover - a family's construction error
        raise TypeError(f"expected an nn.Sequential, got {type(seq).__name__}")
    seq.__class__ = kind


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


def checkpoint_activations(spec: BackboneSpec, net: nn.Module) -> None:
    """--activation-checkpointing on a built backbone (per ResNet stage, per ViT block, timm's own); InputError
    for a backbone that cannot."""
    spec.family.checkpoint_activations(net)


def no_weight_decay(spec: BackboneSpec, net: nn.Module) -> set[str]:
    """Parameter names of `net` (the backbone) never decayed: every 1-D one and the family's own (position
    embeddings, class tokens)."""
    return {n for n, p in net.named_parameters() if p.ndim <= 1} | spec.family.no_weight_decay(net)



def width(net: nn.Module, arch: str, image_size: int) -> int:
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

