"""The option groups: small flat models that the per-subcommand settings (crlf.settings) are built from.

One field is one flag, one ``CRLF_*`` variable and one TOML key; each field's description is its ``--help`` text.
The bounds below reject typos and overflows at parse time, before a run directory is written.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from crlf import catalog
from crlf.errors import did_you_mean

# every float must be finite: inf / nan pass the range checks (inf > 0) and fail late, and --print-config would
# write them as Infinity / NaN, which TOML cannot read back
STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

from crlf.limits import (  # noqa: E402 - the bounds, shared with the library
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_SCALAR,
    MAX_SEED,
    MIN_IMAGE_SIZE,
)


def _leaves(annotation: Any) -> set[Any]:
    """The plain types an annotation is made of: int | None -> {int, NoneType}; list[float] -> {float}."""
    args = typing.get_args(annotation)
    if not args or typing.get_origin(annotation) is Literal:
        return {annotation}
    return set().union(*(_leaves(a) for a in args))


class Group(BaseModel):
    """Base of every settings model: unknown keys and non-finite numbers refused, and no boolean for a number."""

    model_config = STRICT

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic takes true as 1 for a number (TOML's ``epochs = true`` would train one epoch): refuse it."""
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values) and info.field_name is not None:
            kinds = _leaves(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("must be a number, not true / false")
        return value


# the data sources, from their registry (crlf.engine.sources via crlf.catalog): a new source adds its name here
DataSource = Literal[tuple(catalog.SOURCES)]  # type: ignore[valid-type]
_WITH_PATH = [n for n, s in catalog.SOURCES.items() if s["path"]]  # --data-dir required; --test-data-dir allowed
_STREAMING = [n for n, s in catalog.SOURCES.items() if s["streams"]]


class DataSettings(Group):
    """Where the images come from and how they are prepared (shared by every subcommand)."""

    data: DataSource = Field(
        "digits",
        description=", ".join(f"{n} ({s['about']})" if s["about"] else n for n, s in catalog.SOURCES.items()) + ".",
    )
    data_dir: Path | None = Field(
        None,
        description="Data root of cifar10 / cifar100 / stl10 (default ./data), the image folder, "
        "the npy / npz file, or the tar shards (a .tar, a folder of them, or a pattern like 'shards-{000..009}.tar').",
    )
    split: Literal["train", "test", "unlabeled", "train+unlabeled"] | None = Field(
        None, description="train (default), test, unlabeled or train+unlabeled (stl10 pretraining's default)."
    )
    image_size: int | None = Field(
        None,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description="Square side in px (default: the source's: digits 16, CIFAR 32, STL-10 96, folder 64).",
    )
    limit: int | None = Field(
        None, gt=0, description="Random subset of N images (fixed seed), for quick runs."
    )
    download: bool = Field(
        True,
        description="Download cifar10 / cifar100 / stl10 when absent.",
    )
    cache_dir: Path | None = Field(
        None, description="Cache of decoded image folders (default: $XDG_CACHE_HOME/crlf or ~/.cache/crlf)."
    )
    test_data_dir: Path | None = Field(
        None,
        description="Test split (file or folder) of folder / npy / npz / tar data that has none.",
    )
    stream: bool | None = Field(
        None,
        description="folder / tar: decode on the fly at full resolution (default: when the decoded set does not fit "
        "in memory; --no-stream: a memory-mapped cache).",
    )
    workers: int | None = Field(
        None, ge=0, le=256, description="Decoding processes when streaming (default: the CPU count; 0: in-process)."
    )
    gpu_decode: bool = Field(
        False, description="Streaming on CUDA: decode JPEGs on the GPU in batches (torchvision.io).",
    )

    @model_validator(mode="after")
    def _needs_path(self) -> DataSettings:
        if self.data in _WITH_PATH and self.data_dir is None:
            raise ValueError(f"--data {self.data} needs --data-dir (the {catalog.SOURCES[self.data]['path']} to read)")
        if self.test_data_dir is not None and self.data not in _WITH_PATH:
            raise ValueError(
                f"--test-data-dir is for {' / '.join(_WITH_PATH)} data; {self.data} has its own test split"
            )
        if self.stream and self.data not in _STREAMING:
            raise ValueError(f"--stream is for {' and '.join(_STREAMING)} data; {self.data} is read into memory")
        return self


class DeviceSettings(Group):
    """Which accelerator and numeric precision to use."""

    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto (CUDA: bf16, fp16 without bf16; fp32 elsewhere), bf16, fp16 or fp32."
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda, cuda:N or mps")
        return v


class ModelSettings(Group):
    """The encoder (backbone); the projection heads are the methods' (MethodSettings)."""

    arch: str = Field(
        "resnet18",
        description="resnet18, resnet34, resnet50, vit_tiny, vit_small, vit_base or timm:NAME.",
    )
    stem: Literal["auto", "cifar", "imagenet"] = Field(
        "auto",
        description="cifar (3x3 conv, no max-pool), imagenet (7x7, stride 2, max-pool); auto: cifar up to 64 px.",
    )
    patch_size: int | None = Field(
        None, ge=1, le=MAX_IMAGE_SIZE, description="ViTs: patch side in px (default: 4 up to 48 px, 8 below 96, 16)."
    )
    init: str | None = Field(
        None,
        min_length=1,
        description="Starting weights: crlf encoder or run, .safetensors / .pth / .bin, timm:NAME (cached).",
    )
    @field_validator("arch")
    @classmethod
    def _arch_name(cls, v: str) -> str:
        if v in catalog.ARCHS or re.fullmatch(r"timm:[A-Za-z0-9_.\-]+", v):
            return v
        raise ValueError(f"unknown arch {v!r}{did_you_mean(v, catalog.ARCHS)}: choose one of "
                         f"{', '.join(catalog.ARCHS)}, or timm:NAME for any timm model")


def _method_fields() -> dict[str, Any]:
    """One field per option of every registered method (crlf.catalog), each None by default: the chosen method's own
    default then applies (the command layer builds the method's config from the fields that are set)."""
    table = catalog.methods()
    names = list(table["methods"])
    fields: dict[str, Any] = {
        "method": (str, Field("simclr", description=f"{', '.join(names)} (README: how they compare).")),
    }
    fields.update({name: method_field(name, table) for name in table["options"]})
    return fields


def method_field(name: str, table: dict[str, Any]) -> tuple[Any, Any]:
    """The settings field of method option `name` of a catalog table: None by default, the option's bounds, its help
    with each method's default."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    o = table["options"][name]
    groups: dict[Any, list[str]] = {}
    for m, d in table["methods"].items():
        if name in d["defaults"]:
            groups.setdefault(d["defaults"][name], []).append(m)
    (main, users), *others = sorted(groups.items(), key=lambda g: -len(g[1]))
    missing = [m for m in table["methods"] if m not in users]
    who = ", ".join(users) if len(users) <= 3 else "not " + ", ".join(missing)
    main = "none" if main == "" else main
    shown = f"{main}" if others or not missing else f"{main} ({who})"
    shown += "".join(f"; {', '.join(ms)} {v}" for v, ms in others)
    text = f"{o['help']} Default: {shown}."
    return kinds[o["type"]] | None, Field(None, description=text, **o["bounds"])


def _known_method(cls: type, v: str) -> str:
    names = list(catalog.methods()["methods"])
    if v not in names:
        raise ValueError(f"{v!r} is not one of {', '.join(names)}{did_you_mean(v, names)}")
    return v


# The self-supervised method and its own options, generated from the registry (a new method adds its options here
# without an edit); None: the method's default (see --print-config).
MethodSettings: type[Group] = create_model(
    "MethodSettings",
    __base__=Group,
    __doc__="The self-supervised method and its options; None: the method's default (see --print-config).",
    __validators__={"_method_name": field_validator("method")(classmethod(_known_method))},
    **_method_fields(),
)


class AugmentSettings(Group):
    """Strengths of the SimCLR augmentations, applied batched with per-image random parameters."""

    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0, description="Random resized crop: smallest area fraction.")
    crop_max_scale: float = Field(1.0, gt=0.0, le=1.0, description="Random resized crop: largest area fraction.")
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability.")
    jitter_strength: float = Field(
        0.5, ge=0.0, le=10.0, description="Colour jitter strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s."
    )
    jitter_p: float = Field(0.8, ge=0.0, le=1.0, description="Colour jitter probability.")
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0, description="Grayscale probability.")
    blur_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Gaussian blur probability (kernel 10% of the image, sigma 0.1-2)."
    )
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="Largest random rotation in degrees (0: off).")
    noise_std: float = Field(
        0.0, ge=0.0, le=1.0, description="Std of additive Gaussian noise on [0, 1] pixels (0: off)."
    )
    solarize_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Solarization probability (pixels above 0.5 inverted)."
    )

    @model_validator(mode="after")
    def _crop_range(self) -> AugmentSettings:
        if self.crop_min_scale > self.crop_max_scale:
            raise ValueError(
                f"crop_min_scale ({self.crop_min_scale}) must not exceed crop_max_scale ({self.crop_max_scale})"
            )
        return self


class OptimSettings(Group):
    """Optimizer, learning-rate schedule and loss."""

    epochs: int = Field(100, ge=1, le=MAX_EPOCHS, description="Passes over the data set.")
    batch_size: int = Field(512, ge=2, le=MAX_BATCH, description="Source images per step (each gives two views).")
    optimizer: Literal["sgd", "lars", "adam", "adamw"] | None = Field(
        None,
        description="sgd (momentum 0.9), lars, adam or adamw; default: adamw for ViTs, else the method's (sgd).",
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        le=MAX_SCALAR,
        description="Peak lr (default: 0.06 x batch/64 sgd, 0.3 x batch/256 lars, 3e-4 adam, 5e-4 x batch/256 adamw).",
    )
    weight_decay: float | None = Field(
        None, ge=0.0, le=1.0, description="Weight decay (default: 5e-4 sgd, 1e-6 lars, 1e-4 adam, 0.05 adamw)."
    )
    schedule: Literal["cosine", "none", "plateau"] = Field(
        "cosine",
        description="cosine (warm-up, then decay to 0), none (constant) or plateau (halve after 5 stalled epochs).",
    )
    warmup_epochs: float = Field(1.0, ge=0.0, le=MAX_EPOCHS, description="Linear warm-up in epochs.")
    freeze_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="Epochs of the heads alone, the backbone frozen (after --init)."
    )
    layer_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="ViT block lr x this per block from the top (1: off; DINOv2: 0.9)."
    )
    grad_clip: float = Field(0.0, ge=0.0, description="Clip the gradient norm to this value (0: off).")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of weights, shuffling and augmentation (same seed, same run on CPU)."
    )

    @property
    def resolved_lr(self) -> float:
        """The learning rate actually used: explicit, or the optimizer's default scaled with the batch."""
        if self.lr is not None:
            return self.lr
        rule = {
            "sgd": 0.06 * self.batch_size / 64,
            "lars": 0.3 * self.batch_size / 256,
            "adam": 3e-4,
            "adamw": 5e-4 * self.batch_size / 256,
        }
        return rule[self.optimizer or "sgd"]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return {"sgd": 5e-4, "lars": 1e-6, "adam": 1e-4, "adamw": 0.05}[self.optimizer or "sgd"]


class RunSettings(Group):
    """The run directory and how often it is written."""

    out: Path = Field(
        Path("runs/pretrain"), description="Run directory (config, metrics, checkpoints, encoder)."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="Snapshot into checkpoints/ every N epochs."
    )
    keep_checkpoints: int = Field(3, ge=1, description="Snapshots kept in checkpoints/.")
    compile: bool = Field(False, description="torch.compile the model (slower start, faster steps).")
    log_every: float = Field(
        30.0, gt=0.0, description="Seconds between progress lines when stderr is not a terminal."
    )
    sync_bn: bool = Field(
        False,
        description="Under torchrun: BatchNorm statistics over the global batch.",
    )
    knn_every: int = Field(
        0,
        ge=0,
        description="kNN top-1 on the test split every N epochs and at the end, in metrics.jsonl (0: off).",
    )
    # experiment trackers (crlf.engine.trackers; a test keeps these names the registry's)
    logger: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="Tracker: tensorboard, mlflow, wandb (local); repeatable."
    )
    log_every_steps: int = Field(50, ge=0, description="Trackers: loss and lr every N steps (0: off).")


class MemorySettings(Group):
    """Big batches on small devices: the step in chunks with the whole batch's loss, activations recomputed."""

    micro_batch: int = Field(0, ge=0, le=MAX_BATCH, description="Images per chunk, same loss (0: off).")
    activation_checkpointing: bool = Field(False, description="Recompute backbone activations.")


class KnnSettings(Group):
    """The weighted kNN classifier (knn-eval, and pretrain's --knn-every monitor)."""

    k: int = Field(200, ge=1, le=MAX_BATCH, description="Neighbours that vote (clipped to the train size).")
    knn_temperature: float = Field(0.1, gt=0.0, description="Vote weight exp(similarity / temperature).")
