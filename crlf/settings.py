"""Validated settings, one model per subcommand, built from the option groups in crlf.options.

Precedence: CLI flags > ``CRLF_*`` environment variables > ``--config`` TOML file > defaults.
The groups are flat (one field = one flag = one env var = one TOML key), so ``--epochs``,
``CRLF_EPOCHS`` and ``epochs = 3`` are the same setting. Field descriptions are the ``--help`` text.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    SettingsConfigDict,
    SettingsError,
)

from crlf import catalog
from crlf.configfile import COMMANDS, EnvSource, TomlSource, config_file, warn_unknown_env
from crlf.errors import InputError, did_you_mean, quoted
from crlf.limits import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from crlf.options import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SCALAR,
    MAX_SEED,
    AugmentSettings,
    DataSettings,
    DeviceSettings,
    Group,
    KnnSettings,
    MemorySettings,
    MethodSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    method_field,
)

log = logging.getLogger(__name__)
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)

class _CommandSettings(BaseSettings):
    """Base of the per-subcommand models: env prefix, TOML source, strict keys."""

    model_config = SettingsConfigDict(env_prefix="CRLF_", extra="forbid", validate_assignment=True, allow_inf_nan=False)
    section: ClassVar[str] = ""  # the subcommand: also the name of its table in a config file

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        same = [i for i, c in enumerate(COMMANDS) if cls.section and c.section == cls.section]
        if same:  # a model extended with a run-time method's options takes its base's place
            COMMANDS[same[0]] = cls
        else:
            COMMANDS.append(cls)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[override]
        return (init_settings, EnvSource(settings_cls), TomlSource(settings_cls, config_file.get(), cls.section))


class PretrainSettings(
    MemorySettings,
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


_EXTENDED: dict[tuple[str, ...], type[PretrainSettings]] = {}


def pretrain_model() -> type[PretrainSettings]:
    """PretrainSettings, extended by a field for each option of a method registered at run time (a plugin, a test)
    that the generated catalog does not have: the options a new method declares reach the CLI, the TOML file and
    CRLF_* variables without an edit here."""
    table = catalog.methods()
    new = tuple(k for k in table["options"] if k not in PretrainSettings.model_fields)
    if not new:
        return PretrainSettings
    if new not in _EXTENDED:
        fields: dict[str, Any] = {k: method_field(k, table) for k in new}
        _EXTENDED[new] = create_model("PretrainSettings", __base__=PretrainSettings, **fields)
    return _EXTENDED[new]


class EncoderInput(Group):
    """A saved encoder to embed with, and how to batch it (extract, linear-eval, knn-eval)."""

    ckpt: Path | None = Field(
        None, description="Encoder checkpoint: encoder.safetensors (or last.safetensors) written by crlf pretrain; "
        "or public weights as they are: timm:NAME (local cache) or a weights file with --arch."
    )
    arch: str | None = Field(
        None, description="With a plain weights file as --ckpt: the backbone it fits (resnet18, timm:NAME, ...)."
    )
    embed_batch_size: int = Field(512, ge=1, le=MAX_BATCH, description="Images per batch when embedding.")


class EmbeddingsInput(Group):
    """Precomputed embeddings instead of a checkpoint (linear-eval, knn-eval)."""

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


class ExportSettings(_CommandSettings):
    """Everything ``crlf export`` needs: the encoder (as extract's --ckpt / --arch), the format and where to write."""

    section: ClassVar[str] = "export"
    ckpt: Path = Field(..., description=EncoderInput.model_fields["ckpt"].description)
    arch: str | None = Field(None, description=EncoderInput.model_fields["arch"].description)
    image_size: int | None = Field(
        None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="Public weights: their input size (default 224)."
    )
    format: Literal["onnx", "torchscript", "hf"] = Field(
        "onnx", description="onnx / torchscript: one file, preprocessing inside; hf: a Hugging Face model folder."
    )
    out: Path = Field(..., description="The file (onnx, torchscript) or folder (hf) to write.")
    input: Literal["uint8", "float"] = Field(
        "uint8",
        description="The file's input: uint8 (N, H, W, 3) RGB or float (N, 3, H, W) in [0, 1]; other sizes than "
        "the encoder's: centre square, antialiased bilinear resize (as extract resizes arrays).",
    )
    opset: int = Field(18, ge=14, le=20, description="ONNX opset (18 runs on onnxruntime >= 1.14).")
    force: bool = Field(False, description="Replace an existing --out.")


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
            raise ValueError("label fractions must lie in (0, 1]")
        return v

    @model_validator(mode="after")
    def _finetune_needs_images(self) -> LinearEvalSettings:
        if self.finetune and self.ckpt is None:
            raise ValueError("--finetune needs --ckpt and --data (it trains the encoder on the images)")
        return self


class KnnEvalSettings(KnnSettings, EmbeddingsInput, EncoderInput, DeviceSettings, DataSettings, _CommandSettings):
    """Everything ``crlf knn-eval`` needs."""

    section: ClassVar[str] = "knn-eval"


FigureKind = Literal["loss", "pca", "tsne", "umap", "confusion", "neighbors", "augmentations", "reconstructions"]


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
        description="Figure to draw: loss, pca, tsne, umap, confusion, neighbors, augmentations, "
        "reconstructions (MAE runs); repeat for several (default: all the inputs allow).",
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
            raise ValueError(f"--out {quoted(self.out)} names one file: choose one figure with --kind, or a folder")
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
    allow_host: list[str] = Field(
        [],
        description="Another host name the page may be reached by (repeat; *: any): the server answers only to "
        "127.0.0.1, localhost, ::1 and --host, so that no other site's page can read it (DNS rebinding).",
    )
    open: bool = Field(False, description="Open the page in the default web browser.")
    max_upload_mb: float = Field(10.0, gt=0.0, le=1024.0, description="Largest image upload in MB.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the t-SNE / UMAP layout.")

    @field_validator("allow_host")
    @classmethod
    def _host_names(cls, v: list[str]) -> list[str]:
        names = [name.strip().lower().strip("[]") for name in v]
        bad = [n for n in names if not re.fullmatch(r"\*|[a-z0-9.-]+|[0-9a-f:.]+", n) or not n.strip(".:")]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a host name or address: give the name alone, without scheme, port or "
                             "path (photos.lan, 192.168.1.5, ::1, or * for any)")  # fmt: skip
        return names

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
    token = config_file.set(config)
    if issubclass(cls, _CommandSettings):
        warn_unknown_env()
    try:
        return cls(**{k: v for k, v in cli_values.items() if v is not None})
    except ValidationError as e:
        raise InputError("invalid settings: " + "; ".join(_describe(err) for err in e.errors())) from None
    except SettingsError as e:  # a CRLF_* value the environment source cannot decode
        raise InputError(f"invalid settings: {e}; check the CRLF_* environment variables") from None
    finally:
        config_file.reset(token)


def merge(model: type[BaseModelT], given: BaseModel, saved: dict[str, Any], what: str) -> BaseModelT:
    """`model`'s settings as the user gave them (the fields set in `given`), else as `saved` has them (a run's
    config.json, an embeddings file's provenance; None values left out), else the defaults; an InputError that starts
    with `what` when they do not validate."""
    values = {k: v for k, v in saved.items() if k in model.model_fields and v is not None}
    values.update({k: getattr(given, k) for k in model.model_fields if k in given.model_fields_set})
    try:
        return model(**values)
    except ValidationError as e:
        raise InputError(f"{what}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as 'name: what is wrong (got value)'; a list item is named by its setting alone."""
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int))  # kind, not kind.0
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    msg = re.sub(r"\b\d{17,}\b", lambda m: f"{float(m.group()):g}", msg)  # a bound of 1e30, not 31 digits
    if err.get("type") == "extra_forbidden":
        return f"unknown setting {loc!r}"
    if not loc:
        return msg
    name, value = loc.replace("_", "-"), err.get("input")
    if err.get("type") == "literal_error":
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        return f"{name}: {value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"
    echoed = isinstance(value, (str, list)) and repr(value) in msg  # the message names the value already
    shown = "" if isinstance(value, dict) or value is None or echoed else f" (got {value!r})"
    return f"{name}: {msg}{shown}"


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
