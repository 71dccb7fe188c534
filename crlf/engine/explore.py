"""``crlf explore``'s engine: an embedding space held in memory to browse and query, with no web code.

``open_space(settings)`` gathers the points (a run's or a checkpoint's embeddings of its data, train and test splits,
or an ``extract`` file with its images), their labels and ids, a 2-D map (PCA / t-SNE / UMAP), the encoder that
embeds uploads and linear-eval's probe that names their class. Embeddings and maps are computed once and cached in
RUN/explore/ (keyed by the encoder's and the images' hashes, and by the embeddings' hash and the map's settings);
a run directory that cannot be written only means computing again. Nothing is written anywhere else.
"""

from __future__ import annotations

import hashlib
import importlib.util
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

from crlf.engine import sources
from crlf.engine.checkpoint import read_tensors
from crlf.engine.device import select_device
from crlf.engine.embeddings import PROBE_FORMAT, read_embeddings
from crlf.engine.files import atomic_write
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, quoted, short_reason
from crlf.options import DataSettings
from crlf.settings import ExploreSettings, merge

log = logging.getLogger(__name__)

TSNE_MAX_POINTS = 10_000  # --projection auto: t-SNE up to this many points (a few minutes on a CPU), PCA beyond
THUMB_MAX = 96  # thumbnails: the images' own size, at most this many pixels a side
MAX_NEIGHBORS = 100


class _Embedder:
    """The encoder that embeds images as ``crlf extract`` does: the one place that calls the encoder's API."""

    def __init__(self, ckpt: Path, device: torch.device, batch_size: int, precision: str):
        from crlf.engine.encoder import load_encoder

        self.encoder = load_encoder(ckpt, device)
        self.batch_size, self.precision, self.path = batch_size, precision, ckpt
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
        from crlf.engine.sources.images import decode, unreadable

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
    embedder: _Embedder | None = None
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


# --- assembling the space ------------------------------------------------------------------------------------------
def open_space(settings: ExploreSettings) -> Space:
    """Load, embed (or read), project and cache what ``crlf explore`` serves."""
    if settings.projection == "umap" and importlib.util.find_spec("umap") is None:  # say so before the embedding
        raise InputError("--projection umap needs the umap-learn package: pip install umap-learn (or use tsne)")
    device = select_device(settings.device)
    run = _run_dir(settings)
    cache = _Cache(run.path / "explore" if run is not None else None)
    ckpt = _checkpoint(settings, run)
    embedder = _Embedder(ckpt, device, settings.embed_batch_size, settings.precision) if ckpt is not None else None
    if settings.emb is not None:
        x, labels, names, prov = read_embeddings(settings.emb)
        images = _images_of_file(settings, prov, len(x))
        if embedder is not None and embedder.dim != x.shape[1]:
            raise InputError(f"{settings.emb} holds {x.shape[1]}-dim embeddings but {ckpt} gives {embedder.dim}: "
                             "give the --ckpt the file was extracted with")
        ids, source, title = images.ids, prov.get("source") or images.source, settings.emb.name
    else:
        assert embedder is not None
        images = _load_images(settings, run, embedder.image_size)
        key = _digest(embedder.sha256, images.images.numpy())
        x = torch.from_numpy(cache.get(f"embeddings-{key}.npz", lambda: embedder.images(images.images).numpy()))
        labels, names, ids, source = images.labels, images.class_names, images.ids, images.source
        title = run.path.name if run is not None else Path(settings.ckpt or "").name
    bad = int((~torch.isfinite(x).all(dim=1)).sum())
    if bad:
        raise InputError(f"{bad:,} of {len(x):,} embeddings are NaN or infinite: the encoder diverged in training; "
                         "use an earlier checkpoint (checkpoints/epoch-*.safetensors)")
    if len(x) < 3:
        raise InputError(f"explore needs at least 3 images, found {len(x)}")
    method = settings.projection
    if method == "auto":
        method = "tsne" if len(x) <= TSNE_MAX_POINTS else "pca"
        log.info("map: %s of %s points (--projection auto: t-SNE up to %s points)", method, f"{len(x):,}",
                 f"{TSNE_MAX_POINTS:,}")  # fmt: skip
    coords = cache.get(f"map-{method}-{_digest(method, settings.seed, x.numpy())}.npz",
                       lambda: _project(x.numpy(), method, settings.seed))  # fmt: skip
    return Space(
        x,
        fit_unit_square(coords),
        method,
        None if labels is None else labels.numpy().astype(np.int64),
        list(names) or ([] if labels is None else [str(i) for i in range(int(labels.max()) + 1)]),
        list(ids),
        images.images,
        source,
        title,
        embedder,
        _probe(run, embedder, x.shape[1]),
    )


def fit_unit_square(coords: np.ndarray) -> np.ndarray:
    """2-D coordinates scaled into [0, 1] with the aspect ratio kept (the shorter axis centred)."""
    lo, hi = coords.min(0), coords.max(0)
    span = float(max((hi - lo).max(), 1e-12))
    return (((coords - lo) + (span - (hi - lo)) / 2) / span).astype(np.float32)


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    from crlf.engine.visualize import project  # matplotlib comes with it: only when a map is computed

    coords, seconds = project(x, method, seed)
    log.info("computed the %s map of %s points in %.1f s", method, f"{len(x):,}", seconds)
    return coords


def _run_dir(settings: ExploreSettings) -> RunDir | None:
    """--run, else the run directory holding --ckpt (its config.json says so), else None."""
    if settings.run is not None:
        run = RunDir(settings.run.expanduser())
        if not run.path.is_dir():
            raise InputError(f"run directory {quoted(run.path)} does not exist: pass the --out folder of a crlf "
                             "pretrain run")
        return run
    ckpt = settings.ckpt.expanduser() if settings.ckpt is not None else None
    return RunDir(ckpt.parent) if ckpt is not None and (ckpt.parent / "config.json").is_file() else None


def _checkpoint(settings: ExploreSettings, run: RunDir | None) -> Path | None:
    if settings.ckpt is not None:
        return settings.ckpt.expanduser()
    if settings.run is not None and run is not None:
        found = next((p for p in (run.encoder, run.last) if p.is_file()), None)
        if found is None:
            raise InputError(f"{run.path} has no encoder.safetensors: train it with crlf pretrain --out {run.path}")
        return found
    return None  # --emb alone: the map without uploads


def _data_settings(settings: ExploreSettings, saved: dict[str, Any], image_size: int | None) -> DataSettings:
    """The data options given, else the run's (or the embeddings file's) own, at the encoder's image size."""
    saved = {"image_size": image_size, **{k: v for k, v in saved.items() if v is not None}}
    return merge(DataSettings, settings, saved, "invalid data settings for explore")


def _load_images(settings: ExploreSettings, run: RunDir | None, image_size: int) -> sources.ImageSet:
    """The images to explore: --split, or the train split and the test split when the source has one."""
    saved = {k: v for k, v in (run.saved_config() if run is not None else {}).items() if k not in ("limit", "split")}
    options = _data_settings(settings, saved, image_size)
    if "split" in settings.model_fields_set:
        return sources.load(options)
    parts = [sources.load(options, "train")]
    try:
        test = sources.load(options, "test")
        test.ids = [i if i.startswith("test") else f"test/{i}" for i in test.ids]
        parts.append(test)
    except InputError as e:
        log.info("exploring the train split alone: %s", e)
    labelled = all(p.labels is not None for p in parts)
    return sources.ImageSet(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]) if labelled else None,  # type: ignore[misc]
        parts[0].class_names,
        [i for p in parts for i in p.ids],
        " + ".join(p.source for p in parts),
    )


def _images_of_file(settings: ExploreSettings, prov: dict[str, Any], count: int) -> sources.ImageSet:
    """The images an embeddings file was extracted from: the data options given, else its provenance's."""
    saved = {k: prov.get(k) for k in ("data", "data_dir", "split", "image_size")}
    images = sources.load(_data_settings(settings, saved, None))
    if len(images) != count:
        raise InputError(f"{settings.emb} holds {count:,} embeddings but the data options give {len(images):,} "
                         "images: give the data options (--data, --data-dir, --split, --limit) it was extracted from")
    return images


def _probe(run: RunDir | None, embedder: _Embedder | None, dim: int) -> Probe | None:
    """linear-eval's probe of this encoder (RUN/linear_eval_probe.safetensors), else None (with a reason logged)."""
    path = run.path / "linear_eval_probe.safetensors" if run is not None else None
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


def _digest(*parts: Any) -> str:
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


class _Cache:
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
