"""Deployable encoders: an ONNX or TorchScript file that holds the backbone with crlf's preprocessing in front of it
(pixels in, feature rows out, any batch size), checked by running the written file against the PyTorch encoder; and a
Hugging Face folder (crlf.engine.hubfolder).

The preprocessing is embed()'s: images are center-cropped to a square and resized to the encoder's image size with
antialiased bilinear interpolation (torch's ``F.interpolate(..., antialias=True)``, the resize crlf applies to
tensors and arrays), uint8 pixels rounded after the resize as crlf rounds them, then scaled to [0, 1] and normalised
with the encoder's mean and std. The resize is written as two matrix products whose weights are computed from the
input's shape, so both formats take any input size (ONNX's own antialiased Resize does not match torch's).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crlf.engine import hubfolder
from crlf.engine.encoder import Encoder, load_encoder
from crlf.engine.files import atomic_write, check_writable
from crlf.errors import InputError, RunError, short_reason

FORMATS = ("onnx", "torchscript", "hf")
INPUTS = ("uint8", "float")  # uint8 (N, H, W, 3) RGB pixels, or float (N, 3, H, W) in [0, 1]
OPSET = 18  # onnxruntime >= 1.14 runs it; torch's TorchScript-based ONNX exporter writes opsets up to 20
OPSETS = (14, 20)
PROBE = 4  # images of the check (and the first one alone: the batch axis is dynamic)
ONNX_EXTRA = 'pip install "crlf[onnx]"'


@dataclass(frozen=True)
class ExportConfig:
    """What to write: the format, the input the file takes (ONNX / TorchScript), the ONNX opset."""

    format: str = "onnx"
    input: str = "uint8"
    opset: int = OPSET


@dataclass(frozen=True)
class Exported:
    """What export() wrote, and how far the written file's features are from the PyTorch encoder's."""

    path: Path
    format: str
    input: str | None  # None for a Hugging Face folder: it holds weights, not a preprocessing graph
    input_shape: list[str | int] | None
    opset: int | None
    max_diff: float  # largest absolute difference of a feature over the probe batch
    bytes: int  # the file's size, or the folder's files' together
    files: list[str]


def require_onnx() -> None:
    """InputError now, before any work, when onnx or onnxruntime is missing."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise InputError(f"--format onnx needs the {name} package: {ONNX_EXTRA}") from None


# --- the preprocessing ---------------------------------------------------------------------------------------------
def _resize_weights(n: torch.Tensor, size: int) -> torch.Tensor:
    """(size, n) weights of torch's antialiased bilinear resize of n pixels to `size` (align_corners=False): a
    triangle filter widened by the downscale factor, each row normalised; the identity when n == size."""
    scale = n.float() / size
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size, dtype=torch.float32) + 0.5) * scale
    pixel = torch.arange(n).float() + 0.5
    w = (1 - ((pixel[None, :] - centre[:, None]) / support).abs()).clamp(min=0)
    return w / w.sum(1, keepdim=True)


def square_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, size, size): the centred square, resized as sources.base.resize does, with every
    size taken from the tensor's shape so that a traced graph keeps H and W dynamic."""
    h, w = torch.as_tensor(x.shape[-2]), torch.as_tensor(x.shape[-1])
    side = torch.minimum(h, w)
    top, left = torch.div(h - side, 2, rounding_mode="floor"), torch.div(w - side, 2, rounding_mode="floor")
    m = _resize_weights(side, size)
    return m @ x[:, :, top : top + side, left : left + side] @ m.T


class Preprocessed(nn.Module):
    """The encoder's backbone behind its preprocessing: uint8 (N, H, W, 3) or float (N, 3, H, W) images in [0, 1]
    of any size -> float (N, feature_dim) features, as ``Encoder.embed`` computes them."""

    def __init__(self, encoder: Encoder, input: str = "uint8"):
        super().__init__()
        if input not in INPUTS:
            raise InputError(f"--input must be one of {', '.join(INPUTS)}, got {input[:20]!r}")
        self.backbone, self.size, self.uint8 = encoder.backbone, encoder.image_size, input == "uint8"
        mean, std = encoder.normaliser(torch.device("cpu"))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = square_resize(images.permute(0, 3, 1, 2).float() if self.uint8 else images.float(), self.size)
        x = x.round().clamp(0, 255) / 255 if self.uint8 else x
        return self.backbone((x - self.mean) / self.std)


def probe_images(encoder: Encoder, input: str, n: int = PROBE, seed: int = 0) -> torch.Tensor:
    """Seeded random images at the encoder's size, in the layout of `input`."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, encoder.image_size, encoder.image_size), dtype=torch.uint8, generator=g)
    return pixels.permute(0, 2, 3, 1).contiguous() if input == "uint8" else pixels.float() / 255


def _reference(encoder: Encoder, images: torch.Tensor, input: str) -> torch.Tensor:
    """The PyTorch encoder's features of the probe (embed()'s path: float32 on the CPU, no autocast)."""
    pixels = images.permute(0, 3, 1, 2) if input == "uint8" else images
    return encoder.features(pixels, precision="fp32")


# --- writing -------------------------------------------------------------------------------------------------------
def _metadata(encoder: Encoder, input: str) -> dict[str, str]:
    """What the file says about itself (ONNX metadata_props, a TorchScript extra file): crlf's encoder metadata plus
    the input it takes."""
    return {**encoder.metadata(), "input": input, "input_layout": "NHWC uint8" if input == "uint8" else "NCHW [0,1]"}


def _traced(what: str, encoder: Encoder, work: Callable[[], Any]) -> Any:
    """Run an export step with the exporters' warnings silenced; any failure becomes one line (the model does not
    export)."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return work()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - tracers and exporters fail in many ways, each one line here
        raise InputError(f"the {encoder.arch} encoder does not export to {what}: {short_reason(e, 200)}") from None


def _onnx_bytes(module: Preprocessed, example: torch.Tensor, encoder: Encoder, cfg: ExportConfig) -> bytes:
    import onnx

    def work() -> bytes:
        buffer = io.BytesIO()
        h, w = (1, 2) if cfg.input == "uint8" else (2, 3)
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=cfg.opset,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch", h: "height", w: "width"}, "features": {0: "batch"}})
        model = onnx.load_from_string(buffer.getvalue())
        for key, value in _metadata(encoder, cfg.input).items():
            model.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(model)
        return model.SerializeToString()

    return _traced("ONNX", encoder, work)


def _torchscript_bytes(module: Preprocessed, example: torch.Tensor, encoder: Encoder, cfg: ExportConfig) -> bytes:
    def work() -> bytes:
        traced = torch.jit.trace(module, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"crlf.json": json.dumps(_metadata(encoder, cfg.input))})
        return buffer.getvalue()

    return _traced("TorchScript", encoder, work)


def _run_file(data: bytes, fmt: str, batches: list[torch.Tensor]) -> list[np.ndarray]:
    """The written model's features of each batch, run as a user runs it (onnxruntime on the CPU, torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return [session.run(None, {"images": b.numpy()})[0] for b in batches]
    loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad(), torch.jit.optimized_execution(False):  # the graph as saved: no profiling runs to optimise it
        return [loaded(b).numpy() for b in batches]


def _check(encoder: Encoder, data: bytes, cfg: ExportConfig) -> float:
    """The largest absolute difference between the file's features and the PyTorch encoder's, on the probe batch and
    on its first image alone; a RunError when the file does not run or disagrees (then nothing is written)."""
    images = probe_images(encoder, cfg.input)
    want = _reference(encoder, images, cfg.input).numpy()
    try:
        got = _run_file(data, cfg.format, [images, images[:1]])
    except Exception as e:  # noqa: BLE001 - the runtime's own errors, one line
        raise RunError(f"the exported {cfg.format} file does not run: {short_reason(e, 200)}") from None
    diff = max(float(np.abs(got[0] - want).max()), float(np.abs(got[1] - want[:1]).max()))
    scale = max(1.0, float(np.abs(want).max()))
    if not diff <= 1e-3 * scale:  # NaN included
        raise RunError(f"the exported {cfg.format} file's features differ from the PyTorch encoder's by {diff:.3g}: "
                       "not written; please report it with the encoder's arch")  # fmt: skip
    return diff


def check_out(out: Path, fmt: str, force: bool) -> None:
    """InputError now, before any work, when `out` cannot be written: an existing one without `force`, a folder
    where a file goes (or the reverse), a missing or read-only parent folder."""
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"--out {out} exists: add --force to replace it, or choose another --out")
        if (fmt == "hf") != (out.is_dir() and not out.is_symlink()):
            kind = "a file" if fmt == "hf" else "a folder"
            raise InputError(f"--out {out} is {kind}, which --format {fmt} does not replace: choose another --out")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose another "
                         "--out")
    check_writable(out if fmt != "hf" else out.parent / f".{out.name}.tmp", "--out")  # a temporary name beside it


def _hf(encoder: Encoder, out: Path, run: Path | None, force: bool) -> Exported:
    """The Hugging Face folder, read back through load_encoder: the difference of its features (0 when exact)."""
    files = hubfolder.write(out, encoder.backbone.state_dict(), encoder.metadata(), run, force)
    images = probe_images(encoder, "float")
    diff = float((load_encoder(out).features(images, precision="fp32") - _reference(encoder, images, "float"))
                 .abs().max())  # fmt: skip
    size = sum((out / name).stat().st_size for name in files)
    return Exported(out, "hf", None, None, None, diff, size, files)


def export(encoder: Encoder, out: Path, cfg: ExportConfig, run: Path | None = None, force: bool = False) -> Exported:
    """Write `encoder` to `out` as cfg.format says, atomically (a file or folder renamed into place), after checking
    the file by running it; `run`: the run directory the encoder came from, for the model card; `force`: replace an
    existing out."""
    if cfg.format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format[:20]!r}")
    if not OPSETS[0] <= cfg.opset <= OPSETS[1]:
        raise InputError(f"--opset {cfg.opset} is outside {OPSETS[0]}..{OPSETS[1]} (torch's ONNX exporter)")
    check_out(out, cfg.format, force)
    encoder.backbone.to("cpu").eval()
    if cfg.format == "hf":
        return _hf(encoder, out, run, force)
    module = Preprocessed(encoder, cfg.input).eval()
    example = probe_images(encoder, cfg.input, 2)
    data = (_onnx_bytes if cfg.format == "onnx" else _torchscript_bytes)(module, example, encoder, cfg)
    diff = _check(encoder, data, cfg)
    atomic_write(out, lambda f: f.write(data))
    shape: list[str | int] = ["batch", "height", "width", 3] if cfg.input == "uint8" else ["batch", 3, "height",
                                                                                           "width"]  # fmt: skip
    opset = cfg.opset if cfg.format == "onnx" else None
    return Exported(out, cfg.format, cfg.input, shape, opset, diff, len(data), [out.name])
