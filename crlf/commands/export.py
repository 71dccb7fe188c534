"""``crlf export``: an encoder (what extract's --ckpt takes, or a run directory) as an ONNX or TorchScript file with
its preprocessing inside, or as a Hugging Face model folder; the summary of what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crlf.commands.extract import open_encoder
from crlf.engine import export as engine
from crlf.settings import ExportSettings


def _run_dir(ckpt: Path) -> Path | None:
    """The run directory an encoder comes from (for the model card): --ckpt itself, or the folder of its file."""
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    return folder if (folder / "config.json").is_file() and (folder / "encoder.safetensors").is_file() else None


def export(settings: ExportSettings) -> dict[str, Any]:
    """Check --out and the packages first, open the encoder, write it; the summary (--json's document)."""
    out, ckpt = settings.out.expanduser(), settings.ckpt.expanduser()
    if settings.format == "onnx":
        engine.require_onnx()
    engine.check_out(out, settings.format, settings.force)
    run = None if str(settings.ckpt).startswith("timm:") else _run_dir(ckpt)
    if run is not None and ckpt == run:  # a run directory: its encoder
        settings = settings.model_copy(update={"ckpt": run / "encoder.safetensors"})
    encoder = open_encoder(settings, torch.device("cpu"))
    cfg = engine.ExportConfig(format=settings.format, input=settings.input, opset=settings.opset)
    done = engine.export(encoder, out, cfg, run, settings.force)
    return {
        "path": str(done.path),
        "format": done.format,
        "input": done.input,
        "input_shape": done.input_shape,
        "opset": done.opset,
        "max_diff": done.max_diff,
        "bytes": done.bytes,
        "files": done.files,
        "arch": encoder.arch,
        "image_size": encoder.image_size,
        "feature_dim": encoder.feature_dim,
        "mean": encoder.mean,
        "std": encoder.std,
    }
