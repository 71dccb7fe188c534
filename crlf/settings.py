"""Validated settings, one model per subcommand, built from small shared groups.

Precedence: CLI flags > ``CRLF_*`` environment variables > ``--config`` TOML file > defaults.
The groups are flat (one field = one flag = one env var = one TOML key), so ``--epochs``,
``CRLF_EPOCHS`` and ``epochs = 3`` are the same setting. Field descriptions are the ``--help`` text.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from crlf.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# every float must be finite: inf / nan pass the range checks (inf > 0) and fail late, and --print-config would
# write them as Infinity / NaN, which TOML cannot read back
_STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
log = logging.getLogger(__name__)

# upper bounds: values past them are typos or overflows (they used to crash late, after config.json was written)
MIN_IMAGE_SIZE = 8  # the encoder's smallest side (crlf.engine.evaluate.MIN_SIDE)
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1  # what NumPy and scikit-learn accept; torch's per-epoch seeds are derived from it
MAX_WIDTH = 16384  # projection head widths (wide heads in the literature: 8192)
MAX_EPOCHS = 1_000_000
MAX_BATCH = 2**20  # batch sizes, and k neighbours
# --arch names crlf builds itself (crlf.engine.backbones registers a family for each); timm:NAME adds timm's
BUILTIN_ARCHS = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base")
MAX_SCALAR = 1e30  # learning rates: larger values overflow float32 in the optimizer's step
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)

DataSource = Literal["digits", "cifar10", "cifar100", "stl10", "folder", "npy", "npz", "tar"]


class DataSettings(BaseModel):
    """Where the images come from and how they are prepared (shared by every subcommand)."""

    model_config = _STRICT

    data: DataSource = Field(
        "digits",
        description="digits (offline), cifar10, cifar100, stl10, folder (a tree of images), npy, npz "
        "(uint8 NHWC arrays), tar (WebDataset-style .tar shards).",
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
        if self.data in ("folder", "npy", "npz", "tar") and self.data_dir is None:
            what = {"folder": "folder", "tar": "shards"}.get(self.data, "file")
            raise ValueError(f"--data {self.data} needs --data-dir (the {what} to read)")
        if self.test_data_dir is not None and self.data not in ("folder", "npy", "npz", "tar"):
            raise ValueError(
                f"--test-data-dir is for folder / npy / npz / tar data; {self.data} has its own test split"
            )
        if self.stream and self.data not in ("folder", "tar"):
            raise ValueError(f"--stream is for folder and tar data; {self.data} is read into memory")
        return self


class DeviceSettings(BaseModel):
    """Which accelerator and numeric precision to use."""

    model_config = _STRICT

    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto (bf16 autocast on CUDA, fp32 elsewhere), bf16 or fp32."
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device '{v}': use auto, cpu, cuda, cuda:N or mps")
        return v


class ModelSettings(BaseModel):
    """The encoder (backbone) and the projection head."""

    model_config = _STRICT

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
    head_hidden: int | None = Field(
        None, gt=0, le=MAX_WIDTH, description="Width of the head's hidden layers (default: the method's; simclr 2048)."
    )
    head_out: int | None = Field(
        None, gt=0, le=MAX_WIDTH, description="Output size of the projection head (default: the method's; simclr 128)."
    )
    head_layers: int | None = Field(
        None, ge=1, le=4, description="Linear layers in the head (default: the method's; simclr 2)."
    )
    head_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout before each linear layer of the head but the first.",
    )

    @field_validator("arch")
    @classmethod
    def _arch_name(cls, v: str) -> str:
        if v in BUILTIN_ARCHS or re.fullmatch(r"timm:[A-Za-z0-9_.\-]+", v):
            return v
        raise ValueError(f"unknown arch '{v}'{did_you_mean(v, BUILTIN_ARCHS)}: choose one of "
                         f"{', '.join(BUILTIN_ARCHS)}, or timm:NAME for any timm model")


class MethodSettings(BaseModel):
    """The self-supervised method and its own options; None: the method's default (see --print-config)."""

    model_config = _STRICT

    method: Literal["simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "dino", "swav"] = Field(
        "simclr", description="simclr, moco, byol, simsiam, barlow, vicreg, dino or swav (the README compares them)."
    )
    temperature: float | None = Field(
        None, gt=0.0, le=100.0, description="Temperature of the loss (simclr 0.2; below 0.07 is often unstable)."
    )
    queue_size: int | None = Field(
        None, ge=0, le=262144, description="moco: queue of negative keys (4096); 0: MoCo v3-style, no queue."
    )
    pred_hidden: int | None = Field(
        None, gt=0, le=MAX_WIDTH, description="byol, simsiam, moco v3-style: predictor hidden width (4096, 512, 4096)."
    )
    momentum: float | None = Field(
        None, ge=0.0, le=1.0, description="Teacher EMA base, raised to 1 by a cosine (dino 0.996, moco, byol 0.99)."
    )
    teacher_temperature: float | None = Field(
        None, gt=0.0, le=100.0, description="dino: teacher temperature after a warm-up from 0.04 (default 0.07)."
    )
    prototypes: int | None = Field(
        None, ge=1, le=262144, description="dino, swav: number of prototypes K (default: dino 4096, swav 3000)."
    )
    local_crops: int | None = Field(
        None, ge=0, le=32, description="dino, swav: local crops per image besides the 2 global ones (default 4)."
    )
    local_size: int | None = Field(
        None, ge=2, le=MAX_IMAGE_SIZE, description="dino, swav: local crop side in pixels, at most the image's (16)."
    )
    barlow_lambda: float | None = Field(
        None, ge=0.0, le=1e3, description="barlow: weight of the off-diagonal (redundancy) term (default 0.0051)."
    )
    barlow_scale: float | None = Field(
        None, gt=0.0, le=1e3, description="barlow: factor on the whole loss (default 0.1 as solo-learn; 1: official)."
    )
    vicreg_sim: float | None = Field(
        None, ge=0.0, le=1e4, description="vicreg: weight of the invariance (MSE) term (default 25)."
    )
    vicreg_std: float | None = Field(
        None, ge=0.0, le=1e4, description="vicreg: weight of the variance (std hinge) term (default 25)."
    )
    vicreg_cov: float | None = Field(
        None, ge=0.0, le=1e4, description="vicreg: weight of the covariance (off-diagonal) term (default 1)."
    )


class AugmentSettings(BaseModel):
    """Strengths of the SimCLR augmentations, applied batched with per-image random parameters."""

    model_config = _STRICT

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


class OptimSettings(BaseModel):
    """Optimizer, learning-rate schedule and loss."""

    model_config = _STRICT

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


class RunSettings(BaseModel):
    """The run directory and how often it is written."""

    model_config = _STRICT

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


class KnnSettings(BaseModel):
    """The weighted kNN classifier (knn-eval, and pretrain's --knn-every monitor)."""

    model_config = _STRICT

    k: int = Field(200, ge=1, le=MAX_BATCH, description="Neighbours that vote (clipped to the train size).")
    knn_temperature: float = Field(0.1, gt=0.0, description="Vote weight exp(similarity / temperature).")


_config_file: ContextVar[Path | None] = ContextVar("crlf_config_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the ``--config`` TOML file (flat keys, or one ``[pretrain]``-style table)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, section: str):
        super().__init__(settings_cls)
        self.values = read_toml(path, section) if path is not None else {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_toml(path: Path, section: str) -> dict[str, Any]:
    """Read a config file; a table named after the subcommand (e.g. ``[pretrain]``) is merged over the top level."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None
    sections = [c.section for c in _COMMANDS]
    for name, value in data.items():
        if isinstance(value, dict) and name not in sections:
            raise InputError(
                f"config file {path}: unknown table [{name}]{did_you_mean(name, sections, '[{}]')}; the tables are "
                f"{', '.join(f'[{s}]' for s in sections)} (one per subcommand) and keys above them are shared"
            )
    for other in _COMMANDS:
        keys = data.get(other.section)
        bad = sorted(set(keys) - set(other.model_fields)) if isinstance(keys, dict) else []
        if bad:
            raise InputError(
                f"config file {path}: [{other.section}] has unknown setting '{bad[0]}'"
                f"{did_you_mean(bad[0], other.model_fields)}; crlf {other.section} --help lists them"
            )
    table = data.pop(section, {})
    if not isinstance(table, dict):
        raise InputError(f"config file {path}: '{section}' must be a table")
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    # flat keys are shared by every subcommand: each takes its own and passes over the others' (a key that no
    # subcommand knows is still an error); keys in the subcommand's own table are all checked by its model
    known = set().union(*(c.model_fields for c in _COMMANDS))
    unknown = sorted(set(flat) - known)
    if unknown:
        raise InputError(
            f"config file {path}: unknown setting{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}"
            f"{did_you_mean(unknown[0], known)}"
        )
    mine = next((c for c in _COMMANDS if c.section == section), None)
    if mine is not None:
        flat = {k: v for k, v in flat.items() if k in mine.model_fields}
    return {**flat, **table}


def did_you_mean(name: str, choices: Any, shown: str = "'{}'") -> str:
    """' (did you mean X?)' for the choice closest to `name` ('-' and '_' alike), or '' when none is close."""
    norm = {c.replace("-", "_").lower(): c for c in choices}
    close = difflib.get_close_matches(name.replace("-", "_").lower(), list(norm), n=1, cutoff=0.7)
    return f" (did you mean {shown.format(norm[close[0]])}?)" if close else ""


class _EnvSource(EnvSettingsSource):
    """``CRLF_*`` variables. A list setting takes a JSON list, or the natural forms: one value (``CRLF_KIND=loss``)
    or values separated by commas (``CRLF_LABEL_FRACTION=0.1,1``)."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                return value  # validation then names the setting: "Input should be a valid list"
        return [part.strip() for part in value.split(",") if part.strip()]


ENV_READ_ELSEWHERE = ("CRLF_CONFIG", "CRLF_DEBUG")  # variables the CLI reads itself (not settings)


def warn_unknown_env(environ: Any = None) -> list[str]:
    """Warn (do not fail) about each ``CRLF_*`` variable that no subcommand reads, with the closest name; returns
    the warnings. Test hooks (``CRLF_TEST_*``) are left alone."""
    fields = sorted({name.upper() for c in _COMMANDS for name in c.model_fields})
    known = {f"CRLF_{name}" for name in fields} | set(ENV_READ_ELSEWHERE)
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        key = name.upper()
        if key.startswith("CRLF_") and key not in known and not key.startswith("CRLF_TEST_"):
            warnings.append(
                f"ignoring the environment variable {name}: no crlf setting has that name"
                f"{did_you_mean(key.removeprefix('CRLF_'), fields, 'CRLF_{}')}"
            )
            log.warning("%s", warnings[-1])
    return warnings


_COMMANDS: list[type[BaseSettings]] = []


class _CommandSettings(BaseSettings):
    """Base of the per-subcommand models: env prefix, TOML source, strict keys."""

    model_config = SettingsConfigDict(env_prefix="CRLF_", extra="forbid", validate_assignment=True, allow_inf_nan=False)
    section: ClassVar[str] = ""  # the subcommand: also the name of its table in a config file

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _COMMANDS.append(cls)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[override]
        return (init_settings, _EnvSource(settings_cls), _TomlSource(settings_cls, _config_file.get(), cls.section))


class PretrainSettings(
    KnnSettings,
    RunSettings,
    MethodSettings,
    OptimSettings,
    AugmentSettings,
    ModelSettings,
    DeviceSettings,
    DataSettings,
    _CommandSettings,
):
    """Everything ``crlf pretrain`` needs."""

    section: ClassVar[str] = "pretrain"


class EncoderInput(BaseModel):
    """A saved encoder to embed with, and how to batch it (extract, linear-eval, knn-eval)."""

    model_config = _STRICT

    ckpt: Path | None = Field(
        None, description="Encoder checkpoint: encoder.safetensors (or last.safetensors) written by crlf pretrain."
    )
    embed_batch_size: int = Field(512, ge=1, le=MAX_BATCH, description="Images per batch when embedding.")


class EmbeddingsInput(BaseModel):
    """Precomputed embeddings instead of a checkpoint (linear-eval, knn-eval)."""

    model_config = _STRICT

    train_emb: Path | None = Field(
        None, description="Train-split embeddings written by crlf extract (.npy with its .json sidecar, or .npz)."
    )
    test_emb: Path | None = Field(None, description="Test-split embeddings written by crlf extract.")
    results: Path | None = Field(
        None, description="Write the results JSON here (default: beside the checkpoint when it is in a run directory)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EmbeddingsInput:
        ckpt = getattr(self, "ckpt", None)
        given = (self.train_emb is not None, self.test_emb is not None)
        if ckpt is not None and any(given):
            raise ValueError("give either --ckpt (with --data) or --train-emb and --test-emb, not both")
        if ckpt is None and not all(given):
            raise ValueError("needs --ckpt (with --data), or both --train-emb and --test-emb")
        return self


class EmbedSettings(EncoderInput, DeviceSettings, DataSettings):
    """What ``crlf.embed`` needs: an encoder, a data set and the device (extract adds where to write)."""

    normalize: bool = Field(False, description="L2-normalise each embedding.")

    @model_validator(mode="after")
    def _needs_ckpt(self) -> EmbedSettings:
        if self.ckpt is None:
            raise ValueError("needs --ckpt (the encoder to embed with)")
        return self


class ExtractSettings(EmbedSettings, _CommandSettings):
    """Everything ``crlf extract`` needs."""

    section: ClassVar[str] = "extract"
    out: str = Field(
        ...,
        description="Output file: .npy (with a .json sidecar beside it), "
        ".npz (embeddings, labels, ids and provenance), or - for .npy on stdout.",
    )

    @model_validator(mode="after")
    def _out_kind(self) -> ExtractSettings:
        if self.out != "-" and not self.out.endswith((".npy", ".npz")):
            raise ValueError(f"--out must end in .npy or .npz, or be - for stdout (got {self.out!r})")
        return self


class LinearEvalSettings(EmbeddingsInput, EncoderInput, DeviceSettings, DataSettings, _CommandSettings):
    """Everything ``crlf linear-eval`` needs."""

    section: ClassVar[str] = "linear-eval"
    label_fraction: list[float] = Field(
        [1.0],
        description="Train on this class-balanced fraction of the labels; "
        "repeat the flag for a label-efficiency curve.",
    )
    seeds: int = Field(
        1, ge=1, le=1000, description="Repeat each label fraction with this many seeds and report mean and std."
    )
    probe_epochs: int = Field(
        100, ge=1, le=MAX_EPOCHS, description="Epochs of the linear classifier (fine-tuning: of the whole network)."
    )
    probe_lr: float | None = Field(
        None, gt=0.0, le=MAX_SCALAR, description="Learning rate of the classifier (default: the protocol's own)."
    )
    probe_weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Weight decay of the classifier.")
    finetune: bool = Field(
        False, description="Unfreeze the encoder and train it with the linear head (needs --ckpt and --data)."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Base seed of the label subsets and the classifier.")

    @field_validator("label_fraction")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0.0 < f <= 1.0]
        if bad or not v:
            raise ValueError(f"label fractions must lie in (0, 1], got {bad or v}")
        return v

    @model_validator(mode="after")
    def _finetune_needs_images(self) -> LinearEvalSettings:
        if self.finetune and self.ckpt is None:
            raise ValueError("--finetune needs --ckpt and --data (it trains the encoder on the images)")
        return self


class KnnEvalSettings(KnnSettings, EmbeddingsInput, EncoderInput, DeviceSettings, DataSettings, _CommandSettings):
    """Everything ``crlf knn-eval`` needs."""

    section: ClassVar[str] = "knn-eval"


FigureKind = Literal["loss", "pca", "tsne", "umap", "confusion", "neighbors", "augmentations"]


class VisualizeSettings(AugmentSettings, EncoderInput, DeviceSettings, DataSettings, _CommandSettings):
    """Everything ``crlf visualize`` needs. With --run, data and augmentation settings the user did not give come
    from the run's config.json."""

    section: ClassVar[str] = "visualize"
    run: list[Path] = Field(
        [],
        description="Run directory to draw (repeat to overlay several runs' loss curves); "
        "figures go to RUN/figures/ with an index.html.",
    )
    emb: Path | None = Field(
        None, description="Embeddings written by crlf extract (.npy with its sidecar, or .npz) for pca / tsne / umap."
    )
    results: Path | None = Field(
        None, description="A linear-eval result JSON for the confusion figure (default: the run's linear_eval.json)."
    )
    kind: list[FigureKind] = Field(
        [],
        description="Figure to draw: loss, pca, tsne, umap, confusion, neighbors, augmentations; "
        "repeat for several (default: all the inputs allow).",
    )
    out: Path | None = Field(
        None,
        description="An image file (.png, .svg, .pdf) for one figure, or a folder for several "
        "(default: RUN/figures, else ./figures).",
    )
    max_points: int = Field(
        10_000,
        ge=10,
        description="Embeddings drawn in pca / tsne / umap (a seeded random subset; t-SNE is slow beyond 10,000).",
    )
    queries: int = Field(6, ge=1, le=20, description="neighbors: query images (rows of the grid).")
    neighbors: int = Field(8, ge=1, le=20, description="neighbors: nearest neighbours shown per query.")
    views: int = Field(4, ge=1, le=12, description="augmentations: view pairs shown per image.")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the subsets, the t-SNE layout and the augmentations drawn."
    )

    @model_validator(mode="after")
    def _inputs(self) -> VisualizeSettings:
        if self.emb is not None and self.ckpt is not None:
            raise ValueError("give --emb or --ckpt, not both")
        if self.out is not None and self.out.suffix.lower() not in ("", ".png", ".svg", ".pdf"):
            raise ValueError(f"--out must be a folder or end in .png, .svg or .pdf (got {str(self.out)!r})")
        if self.out is not None and self.out.suffix and len(self.kind) != 1:
            raise ValueError(f"--out {self.out} names one file: choose one figure with --kind, or give a folder")
        return self


class ExploreSettings(EncoderInput, DeviceSettings, DataSettings, _CommandSettings):
    """Everything ``crlf explore`` needs. With --run, data settings the user did not give come from the run's
    config.json."""

    section: ClassVar[str] = "explore"
    run: Path | None = Field(
        None,
        description="Run directory to explore: its encoder, its data (train and test splits) and its linear probe; "
        "the map is cached in RUN/explore/.",
    )
    emb: Path | None = Field(
        None,
        description="Embeddings written by crlf extract to show (the images: the data options, else the file's "
        "provenance); add --ckpt to embed uploads.",
    )
    projection: Literal["auto", "pca", "tsne", "umap"] = Field(
        "auto",
        description="The 2-D map: pca, tsne (after PCA to 50 dims), umap (needs umap-learn); auto: tsne up to "
        "10,000 points, pca beyond.",
    )
    neighbors: int = Field(10, ge=1, le=100, description="Nearest neighbours listed for a point or an upload.")
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address to serve on (any other exposes the images to the network)."
    )
    port: int = Field(8765, ge=0, le=65535, description="Port to serve on (0: any free port; the URL goes to stderr).")
    open: bool = Field(False, description="Open the page in the default web browser.")
    max_upload_mb: float = Field(10.0, gt=0.0, le=1024.0, description="Largest image upload in MB.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the t-SNE / UMAP layout.")

    @model_validator(mode="after")
    def _inputs(self) -> ExploreSettings:
        if self.run is not None and (self.ckpt is not None or self.emb is not None):
            raise ValueError("give --run DIR alone, --ckpt with the data options, or --emb (with --ckpt for uploads)")
        if self.run is None and self.ckpt is None and self.emb is None:
            raise ValueError("needs --run DIR, --ckpt FILE with the data options, or --emb FILE")
        return self


def resolve(cls: type[BaseModelT], cli_values: dict[str, Any], config: Path | None = None) -> BaseModelT:
    """Build settings with precedence CLI > CRLF_* env > TOML > defaults (plain groups: the values alone); raise
    InputError listing every problem."""
    token = _config_file.set(config)
    if issubclass(cls, _CommandSettings):
        warn_unknown_env()
    try:
        return cls(**{k: v for k, v in cli_values.items() if v is not None})
    except ValidationError as e:
        raise InputError("invalid settings: " + "; ".join(_describe(err) for err in e.errors())) from None
    except SettingsError as e:  # a CRLF_* value the environment source cannot decode
        raise InputError(f"invalid settings: {e}; check the CRLF_* environment variables") from None
    finally:
        _config_file.reset(token)


def merge(model: type[BaseModelT], given: BaseModel, saved: dict[str, Any], what: str) -> BaseModelT:
    """`model`'s settings as the user gave them (the fields set in `given`), else as `saved` has them (a run's
    config.json, an embeddings file's provenance; None values left out), else the defaults; an InputError that starts
    with `what` when they do not validate."""
    values = {k: v for k, v in saved.items() if k in model.model_fields and v is not None}
    values.update({k: getattr(given, k) for k in model.model_fields if k in given.model_fields_set})
    try:
        return model(**values)
    except ValidationError as e:
        raise InputError(f"{what}: {e.errors()[0]['msg']}") from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    msg = re.sub(r"\b\d{17,}\b", lambda m: f"{float(m.group()):g}", msg)  # a bound of 1e30, not 31 digits
    if err.get("type") == "extra_forbidden":
        return f"unknown setting '{loc}'"
    if not loc:
        return msg
    value = err.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
    return f"{loc.replace('_', '-')}: {msg}{shown}"


def settings_values(settings: BaseModel) -> dict[str, Any]:
    """The settings as JSON values, with the learning rate and weight decay that will be used instead of None."""
    values = settings.model_dump(mode="json")
    if isinstance(settings, OptimSettings):
        values.update(lr=settings.resolved_lr, weight_decay=settings.resolved_weight_decay)
    return values


def to_toml(settings: BaseModel) -> str:
    """The resolved settings as a TOML file that ``--config`` reads back (None values are left out)."""
    lines = []
    for name, value in settings_values(settings).items():
        if value is not None:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
