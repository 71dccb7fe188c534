"""The encoder as one object: backbone + normalisation + image size + backbone spec, saved as one safetensors file.

``crlf.load_encoder(path)`` returns an ``Encoder``; ``encoder.embed(x)`` turns arrays, tensors, PIL images or file
paths into feature rows exactly as ``crlf extract`` does (same decode, resize and normalisation), and
``encoder.transform`` is the same preprocessing for a user's own DataLoader. train, extract, the evaluations,
visualize and explore all pass Encoders, never metadata dicts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from crlf import __version__
from crlf.engine import backbones, hubfolder, progress
from crlf.engine.backbones import BackboneSpec
from crlf.engine.checkpoint import ENCODER_FORMAT, STATE_FORMAT, read_tensors_hashed, save_tensors
from crlf.engine.device import autocast, autocast_dtype, select_device
from crlf.engine.sources.base import resize
from crlf.engine.sources.images import decode, square
from crlf.errors import InputError, short_reason
from crlf.limits import MIN_IMAGE_SIZE  # smaller images vanish in a ResNet's strided stages

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # as --precision


@dataclass
class Encoder:
    """A trained backbone with what it needs to embed images: its spec, the normalisation it was trained with
    (mean / std on [0, 1] pixels), and where it came from (epoch, config, sha256 of the file it was loaded from)."""

    backbone: nn.Module
    spec: BackboneSpec
    mean: list[float]
    std: list[float]
    epoch: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    crlf_version: str = __version__

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def device(self) -> torch.device:
        first = next(iter(self.backbone.parameters()), None)
        return torch.device("cpu") if first is None else first.device

    def normaliser(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std as (1, 3, 1, 1) tensors on `device`, for prepare()."""
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))
        return mean, std

    def to(self, device: str | torch.device) -> Encoder:
        """Move the backbone to `device` (auto, cpu, cuda, cuda:N, mps; InputError when it is not here), in place;
        returns self."""
        self.backbone.to(_device(device))
        return self

    # --- files ---------------------------------------------------------------------------------------------------
    def metadata(self, epoch: int | None = None, config: dict[str, Any] | None = None) -> dict[str, str]:
        """The safetensors metadata that describes this encoder to a reader without the run directory."""
        meta = {
            "arch": self.spec.arch,
            "backbone": self.spec.to_json(),
            "feature_dim": str(self.spec.feature_dim),
            "image_size": str(self.spec.image_size),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "epoch": str(self.epoch if epoch is None else epoch),
            "config": json.dumps(self.config if config is None else config),
        }
        if self.spec.stem:
            meta["stem"] = self.spec.stem
        return meta

    def save(self, path: str | Path) -> None:
        """The backbone alone, in its library's key names, plus the metadata (atomic write)."""
        save_tensors(Path(path), self.backbone.state_dict(), {"format": ENCODER_FORMAT, **self.metadata()})

    # --- embedding -----------------------------------------------------------------------------------------------
    def embed(
        self, images: Any, *, batch_size: int = 256, precision: str = "auto", device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Feature rows (float32 (N, D) on the CPU) of `images`: a uint8 array (N, H, W, 3), (N, H, W, 1) or
        (N, H, W) (grayscale), or one image (H, W, 3) or (H, W); a uint8 or float tensor (N, 3, H, W) (floats in
        [0, 1]); a PIL image, a file path, or a list of any of them. An empty list gives (0, D).

        Files and PIL images are decoded and resized like the folder source, arrays like the npy source, so the rows
        equal ``crlf extract``'s for the same images. `device` moves the backbone there first.
        """
        _check_precision(precision)
        if device is not None:
            self.to(device)
        batch = to_batch(images, self.image_size)
        if not len(batch):
            return torch.zeros(0, self.feature_dim)
        return self.features(batch, batch_size=batch_size, precision=precision)

    def features(
        self,
        images: torch.Tensor | Iterable[torch.Tensor],
        *,
        batch_size: int = 512,
        precision: str = "auto",
        total: int | None = None,
    ) -> torch.Tensor:
        """Features of images already at the encoder's input: a uint8 (N, 3, H, W) tensor, a float one in [0, 1],
        or an iterable of such batches (`total`: their number of images, for progress), in eval mode so a row does
        not depend on its batch; float32 (N, D) on the CPU, in input order. bf16 autocast on CUDA under 'auto'."""
        _check_precision(precision)
        if isinstance(images, torch.Tensor):
            check_images(images, "embed")
            if batch_size <= 0:
                raise InputError(f"batch_size must be positive, got {batch_size}")
            total = len(images)
            if images.shape[-1] != self.image_size:
                log.warning("embedding %dx%d px images with an encoder pretrained on %d px", *images.shape[-2:],
                            self.image_size)
            batches: Iterable[torch.Tensor] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            batches = images
        device = self.device
        mean, std = self.normaliser(device)
        dtype, was_training = autocast_dtype(device, precision), self.backbone.training
        rows: list[torch.Tensor] = []
        done, shown = 0, time.monotonic()
        self.backbone.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    x = batch.to(device, non_blocking=True)
                    x = prepare(x.float().div_(255) if x.dtype == torch.uint8 else x.float(), mean, std)
                    with autocast(device, dtype):
                        rows.append(self.backbone(x).float().cpu())
                    done += len(x)
                    if not progress.report("embedding", done, total or 0) and time.monotonic() - shown > 30:
                        shown = time.monotonic()
                        log.info("embedded %s images", f"{done:,}")
        finally:
            self.backbone.train(was_training)
        if not rows:
            raise InputError("embed: no images to process; check the data source and --limit")
        return torch.cat(rows)

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """One image (PIL, path, or uint8 array (H, W, 3)) -> the normalised float (3, S, S) tensor the backbone
        takes, as embed() prepares it: for a torch DataLoader of the user's own (then ``encoder.backbone(batch)``)."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        size = self.image_size

        def transform(image: Any) -> torch.Tensor:
            return (to_batch(image, size)[0].float() / 255 - mean) / std

        return transform


# --- inputs ----------------------------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    """A device name or torch.device -> a torch.device this machine has (select_device: InputError otherwise)."""
    if isinstance(device, torch.device) and device.type in ("cpu", "mps"):
        return select_device(device.type)  # torch.device("cpu", 0) is the CPU too
    return select_device(str(device))


def _check_precision(precision: str) -> None:
    """InputError unless `precision` is one --precision takes."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {str(precision)[:20]!r}")


def prepare(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> normalised network input, channels_last on CUDA: the one way pretraining,
    embedding and fine-tuning feed a backbone."""
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def check_images(images: torch.Tensor, what: str) -> None:
    """uint8 or finite float (N, 3, H, W), non-empty, sides >= MIN_IMAGE_SIZE; else an InputError saying what to
    change."""
    if images.ndim != 4 or images.shape[1] != 3 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise InputError(
            f"{what}: expected images (N, 3, H, W), uint8 or float in [0, 1], got {images.dtype} "
            f"{tuple(images.shape)}; load them with crlf's data sources"
        )
    if len(images) == 0:
        raise InputError(f"{what}: no images to process; check the data source and --limit")
    if min(images.shape[-2:]) < MIN_IMAGE_SIZE:
        raise InputError(
            f"{what}: images of {images.shape[-2]}x{images.shape[-1]} px are too small for the encoder; "
            f"use --image-size {MIN_IMAGE_SIZE} or more"
        )
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise InputError(f"{what}: the images hold NaN or infinite values; pass pixels in [0, 1] (or uint8)")


def _from_array(x: np.ndarray) -> torch.Tensor:
    """A uint8 array as the npy source reads it -> uint8 (N, 3, H, W): (N, H, W, C) with C 1 or 3, (N, H, W)
    grayscale, or one image (H, W, 3), (H, W, 1) or (H, W)."""
    shape = x.shape
    expected = "uint8 array (N, H, W, 3), (N, H, W, 1), (N, H, W) or one image (H, W, 3), (H, W)"
    if x.dtype != np.uint8:
        raise InputError(f"embed: expected a {expected}, got {x.dtype} {shape}: convert floats in [0, 1] with "
                         "(x * 255).round().astype('uint8')")
    if x.ndim == 2 or (x.ndim == 3 and shape[-1] in (1, 3)):
        x = x[None]  # one image
    x = x[..., None] if x.ndim == 3 else x  # (N, H, W): grayscale, as the npy source
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise InputError(f"embed: expected a {expected}, got shape {shape}")
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_batch(images: Any, size: int) -> torch.Tensor:
    """Anything embed() accepts -> (N, 3, size, size): uint8, or float for float input (N = 0 for an empty
    list or array)."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if isinstance(images, np.ndarray):
        images = _from_array(images)
    if isinstance(images, torch.Tensor):
        images = images[None] if images.ndim == 3 else images
        empty = images.ndim == 4 and images.shape[:2] == (0, 3)
        if empty and (images.dtype == torch.uint8 or images.is_floating_point()):
            return images.new_zeros(0, 3, size, size)
        check_images(images, "embed")
        if images.shape[-2:] == (size, size):
            return images
        return resize(images, size)
    if not isinstance(images, Sequence) or isinstance(images, (bytes, str)):
        raise InputError(f"embed: cannot embed a {type(images).__name__}: pass arrays, tensors, PIL images or paths")
    rows = []
    for item in images:
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            try:
                rows.append(torch.tensor(decode(path, size)).permute(2, 0, 1))
            except Exception as e:  # one line per unreadable file, whatever the decoder raised
                raise InputError(f"embed: cannot read the image {path}: {short_reason(e)}") from None
        elif isinstance(item, Image.Image):
            if 0 in item.size:
                raise InputError(f"embed: a PIL image of {item.width}x{item.height} px has no pixels")
            # as the folder source: a JPEG not yet loaded is decoded at a reduced scale (Image.draft; this sets the
            # caller's image to that scale too), so the rows equal extract's
            rows.append(torch.tensor(square(item, size)).permute(2, 0, 1))
        else:
            rows.extend(to_batch(item, size).unbind(0))  # an array or tensor item: all of its images
    if not rows:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    if len({r.dtype for r in rows}) > 1:
        raise InputError("embed: a list mixes uint8 and float images; pass one kind")
    return torch.stack(rows)


# --- loading ---------------------------------------------------------------------------------------------------------
def load_encoder(path: str | Path, device: str | torch.device = "cpu", backbone: nn.Module | None = None) -> Encoder:
    """Load a crlf encoder (or the backbone of a training state, or a folder of crlf export --format hf) ready for
    inference; `backbone`: the module of your own that an encoder trained with crlf.pretrain(..., backbone=module)
    holds (crlf cannot rebuild it).

    Raises InputError for a file that is not a crlf checkpoint, is truncated, or does not match its architecture.
    The Encoder's ``sha256`` is the hash of the bytes the weights were loaded from.
    """
    device = _device(device)  # before the file is read: an unknown device is a typo
    folder = Path(path).is_dir() and hubfolder.is_folder(Path(path))  # crlf export --format hf
    tensors, meta, file_hash = hubfolder.read(Path(path)) if folder else read_tensors_hashed(Path(path))
    fmt = meta.get("format")
    if fmt == STATE_FORMAT:
        tensors = {k[len("model.backbone.") :]: v for k, v in tensors.items() if k.startswith("model.backbone.")}
    elif fmt != ENCODER_FORMAT:
        raise InputError(
            f"{path} is not a crlf checkpoint (no crlf format in its metadata); "
            "expected a file written by crlf pretrain (public weights: timm:NAME, or the file with --arch)"
        )
    encoder = parse_metadata(meta, path)
    encoder.backbone = backbone if backbone is not None else backbones.build(encoder.spec)
    try:
        encoder.backbone.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise InputError(f"{path} does not match a {backbones.describe(encoder.spec)} encoder: {first}") from None
    encoder.sha256 = file_hash
    encoder.backbone.to(device).eval()
    return encoder


def parse_metadata(meta: dict[str, str], path: str | Path) -> Encoder:
    """Metadata strings -> an Encoder without weights (backbone: an empty placeholder); InputError naming the missing
    key when the file is incomplete, or the value out of range (a crafted or damaged file can carry a valid
    checksum)."""
    try:
        if "backbone" in meta:
            spec = BackboneSpec.from_json(meta["backbone"])
        else:  # crlf < 0.2 wrote ResNets only, as arch + stem
            fields = {"arch": meta["arch"], "stem": meta["stem"]}
            fields.update({k: int(meta[k]) for k in ("image_size", "feature_dim")})
            spec = BackboneSpec.from_json(json.dumps(fields))
        encoder = Encoder(
            nn.Identity(),
            spec,
            json.loads(meta["mean"]),
            json.loads(meta["std"]),
            epoch=int(meta["epoch"]),
            config=json.loads(meta["config"]),
            crlf_version=meta.get("crlf_version", "?"),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(
            f"{path}: crlf checkpoint metadata is incomplete or damaged ({str(e)[:200]}); re-create it with crlf "
            "pretrain"
        ) from None
    problem = _problem(encoder, meta)
    if problem:
        raise InputError(f"{path}: crlf checkpoint metadata is damaged ({problem}); re-create it with crlf pretrain")
    return encoder


def _problem(encoder: Encoder, meta: dict[str, str]) -> str | None:
    """What is wrong with parsed encoder metadata (sizes and normalisation out of range), or None."""
    for key in ("arch", "stem", "image_size", "feature_dim"):  # written beside the spec for older readers
        if key in meta and meta[key] != str(getattr(encoder.spec, key)):
            return f"{key} {meta[key][:40]!r} disagrees with the backbone spec's {getattr(encoder.spec, key)!r}"
    for key in ("mean", "std"):
        v = getattr(encoder, key)
        numbers = isinstance(v, list) and len(v) == 3
        if not numbers or not all(type(x) in (int, float) and math.isfinite(x) for x in v):
            return f"{key} must be a list of 3 finite numbers, found {str(v)[:60]}"
    if min(encoder.std) <= 0:
        return f"std must be positive, found {encoder.std}"
    if encoder.epoch < 0:
        return f"negative epoch {encoder.epoch}"
    if not isinstance(encoder.config, dict):
        return "config is not an object"
    return None
