"""``crlf extract`` / ``crlf.embed``: embed a data set with a saved encoder, written as an embeddings file with its
provenance (crlf.engine.embedfile) or returned as Embeddings; and the embedding steps the evaluation and figure
commands share."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from crlf import __version__
from crlf.engine import sources, weights
from crlf.engine.device import select_device
from crlf.engine.embedfile import Embeddings, write_embeddings
from crlf.engine.encoder import Encoder
from crlf.engine.files import check_writable
from crlf.engine.sources.squares import SquareStream, open_images
from crlf.errors import InputError, quoted
from crlf.options import DataSettings
from crlf.settings import EmbedSettings, EncoderInput, ExportSettings, ExtractSettings, resolve

log = logging.getLogger(__name__)


def open_encoder(settings: EncoderInput | ExportSettings, device: torch.device) -> Encoder:
    """The encoder --ckpt names, on `device`: crlf's, or public weights (timm:NAME, a weights file with --arch)."""
    assert settings.ckpt is not None
    return weights.open_encoder(settings.ckpt, device, settings.arch, getattr(settings, "image_size", None))


def encoder_data(settings: DataSettings, encoder: Encoder) -> DataSettings:
    """The data settings with the encoder's image size unless the user chose one."""
    return settings.model_copy(update={"image_size": settings.image_size or encoder.image_size})


def embed_images(
    encoder: Encoder, images: sources.ImageSet | SquareStream, batch_size: int, precision: str = "auto"
) -> torch.Tensor:
    """Features of a data set in memory or streamed (float32 N x D on the CPU; streamed: one row per readable image),
    with a log line of how long it took."""
    t0 = time.perf_counter()
    pixels = images if isinstance(images, SquareStream) else images.images
    x = encoder.features(pixels, batch_size=batch_size, precision=precision, total=len(images))
    log.info(
        "embedded %s %s image%s in %.1f s (%d dims)",
        f"{len(x):,}",
        images.source,
        "" if len(x) == 1 else "s",
        time.perf_counter() - t0,
        x.shape[1],
    )
    return x


def embed_split(
    encoder: Encoder, data_settings: DataSettings, split: str | None, batch_size: int, precision: str
) -> tuple[torch.Tensor, sources.ImageSet | SquareStream]:
    """A split's features and its images (in memory) or stream (whose ids and labels are the rows embedded)."""
    images = open_images(data_settings, split, batch_size)
    return embed_images(encoder, images, batch_size, precision), images


def embed(ckpt: str | Path, **options: Any) -> Embeddings:
    """``crlf extract`` without files: embed a data set with a saved encoder.

    options are extract's settings: data, data_dir, split, image_size, limit, device, embed_batch_size, normalize, ...
    e.g. ``crlf.embed("runs/c10/encoder.safetensors", data="cifar10", data_dir="~/data", split="test")``.
    """
    return embeddings_of(resolve(EmbedSettings, {"ckpt": ckpt, **options}))


def embeddings_of(settings: EmbedSettings) -> Embeddings:
    """The embeddings `settings` ask for, with their provenance; an InputError when the encoder gives NaN rows."""
    device = select_device(settings.device)
    encoder = open_encoder(settings, device)
    data_settings = encoder_data(settings, encoder)
    x, images = embed_split(encoder, data_settings, settings.split, settings.embed_batch_size, settings.precision)
    bad = int((~torch.isfinite(x).all(dim=1)).sum())
    if bad:
        raise InputError(f"{quoted(settings.ckpt)} gives NaN or infinite embeddings for {bad:,} of {len(x):,} "
                         "images: the encoder diverged in training; use an earlier checkpoint "
                         "(checkpoints/epoch-*.safetensors)")
    if settings.normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    resolved = encoder.config.get("resolved")
    init = resolved.get("init") if isinstance(resolved, dict) else None  # the weights the run started from
    provenance = {
        "crlf_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(settings.ckpt),
        "checkpoint_sha256": encoder.sha256,  # of the bytes the weights were loaded from
        "init": {k: init.get(k) for k in ("source", "sha256")} if isinstance(init, dict) else None,
        "data": settings.data,
        "data_dir": None if settings.data_dir is None else str(settings.data_dir),
        "split": sources.split_of(settings),
        "source": images.source,
        "count": len(x),
        "dim": x.shape[1],
        "l2_normalized": settings.normalize,
        "image_size": data_settings.image_size,
        "mean": encoder.mean,
        "std": encoder.std,
        "arch": encoder.arch,
        "backbone": json.loads(encoder.spec.to_json()),
    }
    return Embeddings(x, images.labels, images.ids, images.class_names, provenance)


def extract(settings: ExtractSettings, stdout: BinaryIO | None = None) -> dict[str, Any]:
    """Embed a data set with a saved encoder and write it (``--out -``: the .npy goes to `stdout`); returns a
    summary."""
    out = None if settings.out == "-" else Path(settings.out).expanduser()
    if out is not None:  # fail before embedding, not after
        check_writable(out, "--out")
    emb = embeddings_of(settings)
    arr = emb.x.numpy()
    if out is None:
        assert stdout is not None, "--out - needs a stream"
        np.save(stdout, arr)
        stdout.flush()
    else:
        write_embeddings(out, emb)
    return {
        "out": settings.out,
        "count": len(arr),
        "dim": arr.shape[1],
        "labels": emb.labels is not None,
        "sidecar": None if out is None or out.suffix == ".npz" else str(out) + ".json",
        "source": emb.provenance["source"],
    }
