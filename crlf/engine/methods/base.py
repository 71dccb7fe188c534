"""The method interface, its registry and the helpers every method uses: a new method is one module beside this.

A method is an ``nn.Module`` around any backbone that owns everything it trains or keeps besides it: projection
heads, predictors, momentum teachers, queues, centres. It sees only its own config (a frozen dataclass with the
method's real defaults), never the CLI's settings, so it works in a user's own loop as well as in crlf's:

    method = SimCLR(backbone, SimCLRConfig(temperature=0.2), feature_dim=512)
    recipe = method.recipe(augment.Augment(), image_size=32)    # the method's views, as a value
    views = augment.draw(recipe, uint8_batch, generator)        # float views in [0, 1]
    loss = method([normalise(v) for v in views])                # the loss of the global batch
    loss.backward(); optimizer.step()
    method.after_step(step, total_steps, epochs)                # teachers, queues, centres: after the optimizer step

Big batches (``--micro-batch M``, crlf.engine.gradcache): a method whose loss spans the batch splits its forward in
two, ``forward(views) = objective(embed(views))`` (Method.forward does exactly that):

- ``embed(views) -> list of tensors``: the network outputs of *this process's* views that the loss needs (students
  with gradients, teachers under no_grad), each with the batch first, row i from image i of the views (per view or
  per crop: one tensor each), not gathered over processes; it changes no state but BatchNorm's running statistics
  and may draw random numbers (dropout, stochastic depth: the chunk's random state is replayed).
- ``objective(embeddings) -> loss``: the loss of the global batch from embed's outputs of the whole batch (it
  gathers them over processes); run once per step, so queues and centres are updated here or in after_step.

Gradient caching then embeds the batch in chunks of M images without a graph, back-propagates the objective to the
embeddings and re-runs each chunk with its slice of that gradient: the loss and gradients of the whole batch. A
method whose loss is a mean over images of the global batch (BYOL, SimSiam) sets ``per_image_loss = True`` instead:
its chunks' losses, weighted M / B, are back-propagated one by one (no second forward). A method with neither refuses
``--micro-batch``. A method for masked-image modelling follows the same split (the mask drawn in embed, for the
batch's rows).

``method.backbone`` is the encoder that extract, the evaluations and the kNN monitor use. Everything the method
keeps lives in its ``state_dict`` (parameters and buffers), so checkpoints and exact resume need nothing more.

The registry is the one list of method names and options: the settings layer (which must not import torch) reads
them from the generated table crlf/catalog.py, which a test keeps equal to ``catalog()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.methods.teacher import ema_, momentum_at
from crlf.errors import InputError

REGISTRY: dict[str, type[Method]] = {}


def opt(default: Any, help: str = "", identity: bool = False, **bounds: float) -> Any:
    """A config field with what the CLI needs to offer it as a flag: its help text (or the shared one of
    SHARED_OPTIONS), its bounds (pydantic's gt / ge / lt / le) and whether it defines the run (--resume refuses
    another value)."""
    return dataclasses.field(default=default, metadata={"help": help, "identity": identity, "bounds": bounds})


# options several methods have: declared once here; a method's config names them with its own default
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "head_hidden": {"help": "Head hidden layers' width.", "identity": True, "bounds": {"gt": 0, "le": 16384}},
    "head_out": {"help": "Projection head output size.", "identity": True, "bounds": {"gt": 0, "le": 16384}},
    "head_layers": {"help": "Linear layers in the projection head.", "identity": True, "bounds": {"ge": 1, "le": 4}},
    "head_dropout": {"help": "Dropout before each head layer but the first.", "identity": True,
                     "bounds": {"ge": 0.0, "lt": 1.0}},
    "temperature": {"help": "Loss temperature (below 0.07: often unstable).", "identity": False,
                    "bounds": {"gt": 0.0, "le": 100.0}},
    "pred_hidden": {"help": "Predictor hidden width.", "identity": True, "bounds": {"gt": 0, "le": 16384}},
    "momentum": {"help": "Teacher EMA base, raised to 1 by a cosine.", "identity": False,
                 "bounds": {"ge": 0.0, "le": 1.0}},
    "prototypes": {"help": "Number of prototypes K.", "identity": True, "bounds": {"ge": 1, "le": 262144}},
    "local_crops": {"help": "Local crops besides the 2 global ones.", "identity": False,
                    "bounds": {"ge": 0, "le": 32}},
    "local_size": {"help": "Local crop side in px (at most the image's).", "identity": False,
                   "bounds": {"ge": 2, "le": 4096}},
    "mask_ratio": {"help": "Fraction of each image's patches masked.", "identity": False,
                   "bounds": {"gt": 0.0, "lt": 1.0}},
}  # fmt: skip


class Method(nn.Module):
    """The interface every method implements (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type]  # the method's frozen dataclass config
    optimizer: ClassVar[str] = "sgd"  # the optimizer its defaults are tuned for (a ViT backbone takes adamw)
    # the recipe's own Adam(W): peak lr per 256 images (None: crlf's rule for the optimizer) and betas
    adam_lr: ClassVar[float | None] = None
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    generator: torch.Generator | None = None  # set_generator's
    per_image_loss: ClassVar[bool] = False  # a mean over images: --micro-batch accumulates chunks (module docstring)

    def __init__(self, backbone: nn.Module, config: Any = None, feature_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.Config()
        self.feature_dim = feature_dim if feature_dim is not None else width_of(backbone)

    @classmethod
    def recipe(cls, config: Any, aug: augment.Augment, image_size: int) -> augment.Recipe:
        """The views this method trains on, for `image_size`-pixel images; default: the SimCLR pair."""
        return augment.pair_recipe(aug)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of the global batch; a method without the embed / objective split overrides this."""
        return self.objective(self.embed(views))

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover - the interface
        """This process's network outputs that the loss needs, batch first, not gathered (module docstring)."""
        raise NotImplementedError

    def objective(self, embeddings: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - the interface
        """The loss of the global batch from embed's outputs of the whole batch (module docstring)."""
        raise NotImplementedError

    @classmethod
    def splits(cls) -> bool:
        """Whether the method has the embed / objective split that gradient caching needs."""
        return cls.embed is not Method.embed and cls.objective is not Method.objective

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel statistics the views are normalised with, for a method that must see the pixels (a
        teacher with its own normalisation); the others ignore it."""

    def set_generator(self, generator: torch.Generator | None) -> None:
        """The generator a method that draws random numbers in forward (MAE's masks) draws them from: the loop gives
        its augmentation generator, drawn from after the step's views, so a seed reproduces them and --resume
        continues them exactly. Unset (a user's own loop): torch's global generator."""
        self.generator = generator

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) modules whose target follows by EMA after each step (moco, byol, dino)."""
        return []

    def after_step(self, step: int, total_steps: int, epochs: int) -> None:
        """Called after each optimizer step (`step` counts from 1 of `total_steps` in `epochs`): the momentum
        targets follow their online modules (BYOL's cosine schedule from config.momentum to 1); subclasses add
        their queues, centres and schedules."""
        pairs = self.momentum_pairs()
        if pairs:
            m = momentum_at(step, total_steps, self.config.momentum)
            for online, target in pairs:
                ema_(target, online, m)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``--method NAME`` with its config's options."""
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"method {cls.__name__} needs a dataclass Config")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The method registered as `name`; an InputError naming the others otherwise."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise InputError(f"--method {name} is not available in this version of crlf: "
                         f"choose one of {', '.join(sorted(REGISTRY))}")  # fmt: skip
    return cls


def options(cls: type[Method]) -> dict[str, dict[str, Any]]:
    """Each option of a method's config: its type name, default, help, bounds and whether it defines the run."""
    hints = typing.get_type_hints(cls.Config)
    out = {}
    for f in dataclasses.fields(cls.Config):
        shared = SHARED_OPTIONS.get(f.name, {})
        out[f.name] = {
            "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
            "default": f.default,
            "help": f.metadata.get("help") or shared.get("help", ""),
            "identity": f.metadata.get("identity", False) or shared.get("identity", False),
            "bounds": f.metadata.get("bounds") or shared.get("bounds", {}),
        }
    return out


def catalog() -> dict[str, Any]:
    """The registry as plain data (what crlf/catalog.py holds): per method, in registration order, its summary,
    optimizer and option defaults; per option name (the first declaration of it) its type, help, bounds and whether
    it defines the run."""
    table: dict[str, Any] = {"methods": {}, "options": {}}
    for name, cls in REGISTRY.items():
        opts = options(cls)
        table["methods"][name] = {"summary": (cls.__doc__ or "").strip().splitlines()[0], "optimizer": cls.optimizer,
                                  "defaults": {k: o.pop("default") for k, o in opts.items()}}  # fmt: skip
        for k, o in opts.items():
            table["options"].setdefault(k, o)
    return table


def width_of(backbone: nn.Module, image_size: int = 32) -> int:
    """The feature width of any backbone, read off one forward pass of a blank batch (as timm's are)."""
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return int(backbone(torch.zeros(2, 3, image_size, image_size)).flatten(1).shape[1])
    finally:
        backbone.train(was)


def pair(net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`net` over both views in one pass, each half gathered over every process with its gradients: the outputs
    of the global batch, view by view."""
    z1, z2 = net(torch.cat(views[:2])).chunk(2)  # (B, D) each
    return distributed.gather(z1), distributed.gather(z2)


def two_views(net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """`net` over both views in one pass: this process's outputs, view by view (not gathered)."""
    return list(net(torch.cat(views[:2])).chunk(2))


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


@contextlib.contextmanager
def full_precision(like: torch.Tensor) -> Iterator[None]:
    """Losses in float32 even inside the step's bf16 autocast (softmaxes over large similarity matrices)."""
    with torch.autocast(device_type=like.device.type, enabled=False):
        yield
