"""``crlf explore``'s engine: an embedding space held in memory to browse and query, with no web code.

A ``Space`` holds the points (features, their 2-D map in the unit square, labels, ids, images), the ``Embedder`` that
embeds uploads and linear-eval's ``Probe`` that names their class; ``Cache`` keeps computed embeddings and maps in
RUN/explore/ (keyed by ``digest`` of their inputs). crlf.commands.explore assembles a Space from the settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from crlf.engine.checkpoint import read_tensors
from crlf.engine.encoder import Encoder
from crlf.engine.evalresults import PROBE_FORMAT
from crlf.engine.files import atomic_write
from crlf.engine.sources.images import decode, unreadable
from crlf.errors import InputError, short_reason

log = logging.getLogger(__name__)

THUMB_MAX = 96  # thumbnails: the images' own size, at most this many pixels a side
MAX_NEIGHBORS = 100


class Embedder:
    """The encoder that embeds images as ``crlf extract`` does: the one place that calls the encoder's API."""

    def __init__(self, encoder: Encoder, batch_size: int, precision: str):
        self.encoder = encoder
        self.batch_size, self.precision = batch_size, precision
        self.image_size: int = self.encoder.image_size
        self.dim: int = self.encoder.feature_dim
        self.sha256: str = self.encoder.sha256 or ""
        self._lock = threading.Lock()  # one upload at a time through the model (the server is threaded)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32 (N, D) on the CPU."""
        with self._lock:
            return self.encoder.features(images, batch_size=self.batch_size, precision=self.precision)

    def file(self, stream: BinaryIO, suffix: str) -> torch.Tensor:
        """One image file's bytes, decoded as the folder source decodes files -> float32 (D,)."""
        try:
            pixels = decode(stream, self.image_size, suffix=suffix, max_pixels=Image.MAX_IMAGE_PIXELS)
        except InputError:
            raise
        except Exception as e:  # whatever the decoder raised: the upload is not an image it can read
            raise InputError(f"not an image crlf can read ({unreadable(e)}): upload a PNG, JPEG, WebP, TIFF, "
                             "...") from None
        return self.images(torch.tensor(pixels).permute(2, 0, 1)[None].contiguous())[0]  # a copy: writable


@dataclass
class Probe:
    """linear-eval's full-label classifier on raw features: logits = x @ weight.T + bias."""

    weight: torch.Tensor  # float32 (C, D)
    bias: torch.Tensor  # float32 (C,)
    class_names: list[str]

    def predict(self, x: torch.Tensor, top: int = 3) -> dict[str, Any]:
        """The most likely class of a feature row, its softmax confidence, and the runners-up."""
        p = torch.softmax(self.weight @ x.float() + self.bias, dim=0)
        conf, idx = p.topk(min(top, len(p)))
        ranked = [{"label": int(i), "class": self._name(int(i)), "confidence": float(c)} for c, i in zip(conf, idx)]
        return {**ranked[0], "top": ranked}

    def _name(self, i: int) -> str:
        return self.class_names[i] if i < len(self.class_names) else str(i)


@dataclass
class Space:
    """The explored points: features, their unit rows for cosine search, the 2-D map, labels, ids and images."""

    x: torch.Tensor  # float32 (N, D)
    coords: np.ndarray  # float32 (N, 2), the map, scaled into [0, 1] (aspect kept)
    projection: str
    labels: np.ndarray | None  # int64 (N,)
    class_names: list[str]
    ids: list[str]
    images: torch.Tensor  # uint8 (N, 3, H, W)
    source: str
    title: str
    embedder: Embedder | None = None
    probe: Probe | None = None
    z: np.ndarray = field(init=False)  # float32 (N, D), L2-normalised rows

    def __post_init__(self) -> None:
        # NumPy, not torch: torch's thread pool adds ~10 ms to each small product on a busy CPU
        self.z = np.ascontiguousarray(torch.nn.functional.normalize(self.x.float(), dim=1).numpy())

    def __len__(self) -> int:
        return len(self.x)

    def info(self) -> dict[str, Any]:
        """What the page shows about the space, and which features are on."""
        return {
            "title": self.title,
            "source": self.source,
            "count": len(self),
            "dim": self.x.shape[1],
            "projection": self.projection,
            "class_names": self.class_names,
            "labelled": self.labels is not None,
            "uploads": self.embedder is not None,
            "probe": self.probe is not None,
        }

    def points(self) -> dict[str, Any]:
        """The map as the page draws it: coordinates in [0, 1] (5 decimals), labels, ids."""
        return {
            "x": np.round(self.coords[:, 0].astype(np.float64), 5).tolist(),
            "y": np.round(self.coords[:, 1].astype(np.float64), 5).tolist(),
            "labels": None if self.labels is None else self.labels.tolist(),
            "ids": self.ids,
        }

    def describe(self, i: int) -> dict[str, Any]:
        label = None if self.labels is None else int(self.labels[i])
        return {"index": i, "id": self.ids[i], "label": label, "class": self.class_name(label)}

    def class_name(self, label: int | None) -> str | None:
        if label is None:
            return None
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def neighbors(self, query: int | torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The k rows most similar (cosine) to point `query` (itself left out) or to a feature row, best first."""
        own = isinstance(query, int)
        if own:
            if not 0 <= query < len(self):
                raise IndexError(query)
            q = self.z[query]
        else:
            q = torch.nn.functional.normalize(query.float(), dim=0).numpy()
        k = max(1, min(k, len(self) - own))
        sims = self.z @ q  # one matrix-vector product: (N,)
        top = min(k + own, len(self))
        idx = np.argpartition(-sims, top - 1)[:top] if top < len(self) else np.arange(len(self))
        idx = idx[np.argsort(-sims[idx], kind="stable")]
        found = [int(i) for i in idx if not (own and i == query)][:k]
        return [{**self.describe(i), "similarity": round(float(sims[i]), 5)} for i in found]

    def search(self, text: str) -> list[int]:
        """Indices of the points whose class name or id contains `text` (case-insensitive)."""
        needle = text.strip().lower()
        if not needle:
            return []
        classes = {c for c, name in enumerate(self.class_names) if needle in name.lower()}
        hit = np.array([needle in name.lower() for name in self.ids], dtype=bool)
        if self.labels is not None and classes:
            hit |= np.isin(self.labels, list(classes))
        return np.flatnonzero(hit).tolist()

    def thumbnail(self, i: int) -> bytes:
        """Point i's image as a PNG (at most THUMB_MAX px a side)."""
        im = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        if max(im.size) > THUMB_MAX:
            im = im.resize((THUMB_MAX, THUMB_MAX), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def query_image(self, stream: BinaryIO, filename: str, k: int) -> dict[str, Any]:
        """An uploaded image file: its embedding, its nearest points and the probe's class."""
        if self.embedder is None:
            raise InputError("uploads need the encoder: start crlf explore with --run DIR or --ckpt FILE")
        row = self.embedder.file(stream, Path(filename or "").suffix)
        return {
            "neighbors": self.neighbors(row, k),
            "prediction": None if self.probe is None else self.probe.predict(row),
            "embedding": row.tolist(),
        }


def read_probe(path: Path | None, embedder: Embedder | None, dim: int) -> Probe | None:
    """linear-eval's probe of this encoder (`path`: RUN/linear_eval_probe.safetensors), else None (with a reason
    logged)."""
    if path is None or embedder is None or not path.is_file():
        log.info("no class predictions for uploads: run crlf linear-eval on the run's encoder to get them")
        return None
    try:
        tensors, meta = read_tensors(path)
        weight, bias = tensors["weight"].float(), tensors["bias"].float()
        names = json.loads(meta.get("class_names", "[]"))
        if meta.get("format") != PROBE_FORMAT or weight.ndim != 2 or bias.shape != (len(weight),):
            raise ValueError("not a linear probe written by crlf linear-eval")
    except (InputError, KeyError, ValueError) as e:
        log.warning("ignoring %s (%s): no class predictions for uploads", path, e)
        return None
    if weight.shape[1] != dim or meta.get("checkpoint_sha256", embedder.sha256) != embedder.sha256:
        log.warning("%s was trained on another encoder's features: no class predictions for uploads (run crlf "
                    "linear-eval again)", path)  # fmt: skip
        return None
    return Probe(weight, bias, [str(n) for n in names])


def digest(*parts: Any) -> str:
    """16 hex digits of SHA-256 over strings and arrays (their bytes, dtype and shape)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).data)
        else:
            h.update(f"{part}|".encode())
    return h.hexdigest()[:16]


def _sha256(value: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(value).data).hexdigest()


class Cache:
    """.npz files in RUN/explore/, named by their inputs' key and holding the array with its SHA-256 (a damaged file
    is computed again, not shown); older files of the same kind are removed.

    Unwritable (read-only run, full disk) or no run directory: compute without caching, after one warning."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None and folder.is_symlink():
            log.warning("%s is a symbolic link: crlf never writes through links in a run directory (not caching)",
                        folder)  # fmt: skip
            self.folder = None

    def get(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.folder / name if self.folder is not None else None
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as found:
                    value, digest = found["value"], str(found["sha256"])
                if value.ndim == 2 and value.dtype == np.float32 and _sha256(value) == digest:
                    log.info("using the cached %s", path)
                    return value
                log.warning("ignoring the cache %s (it does not match its checksum): computing again", path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                log.warning("ignoring the unreadable cache %s (%s): computing again", path, short_reason(e))
        t0 = time.perf_counter()
        value = np.ascontiguousarray(compute(), dtype=np.float32)
        if path is not None:
            self._write(path, value, time.perf_counter() - t0)
        return value

    def _write(self, path: Path, value: np.ndarray, seconds: float) -> None:
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, lambda f: np.savez(f, value=value, sha256=np.array(_sha256(value))))
            kind = path.name.rsplit("-", 1)[0]
            for old in [*path.parent.glob(f"{kind}-*.npz"), *path.parent.glob(f"{kind}-*.npy")]:  # .npy: older crlf
                if old != path and old.name.count("-") == path.name.count("-"):
                    old.unlink(missing_ok=True)
            log.info("cached in %s (%.1f s of work)", path, seconds)
        except OSError as e:
            log.warning("cannot cache in %s (%s): computing it again on every start", path.parent,
                        short_reason(e))  # fmt: skip
            self.folder = None
