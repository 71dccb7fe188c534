"""A catalogued split (folder or tar shards) decoded once at one size, kept as a memory-mapped cache.

The cache is a plain ``.npy`` of uint8 (N, 3, S, S), opened read-only with ``numpy.load(mmap_mode="r")``, and a small
JSON sidecar (ids, labels, class names, skipped files). A data set larger than memory but small in pixels trains
from it without decoding again: the page cache holds what fits, the disk the rest. It is keyed by what the catalogue
is, the size and the files' names, sizes and modification times, and is replaced when any of them change.

The sidecar holds a SHA-256 of each 16 MiB chunk of the images and one of itself (covering those): each open checks
both, hashing the chunks on every core, and a cache that does not match (a flipped byte, ids edited or from another
decode) or has no checksum (an older crlf's) is decoded again, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from crlf.engine.files import atomic_write, new_file_mode
from crlf.engine.sources.base import Catalog, ImageSet
from crlf.engine.sources.images import decode, unreadable
from crlf.errors import InputError, short_reason

log = logging.getLogger(__name__)

_CACHE_VERSION = 3  # bump when decoding or the cache format changes (2: printable ids; 3: .npy + .json sidecar)


def cache_dir(configured: Path | None) -> Path:
    """--cache-dir, else $XDG_CACHE_HOME/crlf, else ~/.cache/crlf."""
    if configured is not None:
        return configured.expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crlf"


def load_catalog(catalog: Catalog, size: int, configured_cache: Path | None = None) -> ImageSet:
    """Every image of `catalog` at size x size (shorter side scaled, centre crop), from the cache when it is valid,
    else decoded (thread pool) into a new cache; unreadable images are skipped and counted in one warning."""
    kind = catalog.source.split(":", 1)[0]
    where = hashlib.sha256(json.dumps([catalog.identity, size, _CACHE_VERSION]).encode()).hexdigest()[:16]
    cache = cache_dir(configured_cache) / f"{kind}-{where}-{catalog.fingerprint[:16]}.npy"
    shown = catalog.source.split(":", 1)[1]
    cached = _read_cache(cache, catalog.source)
    if cached is not None:
        log.info("using the cached decode of %s (%s images): %s", shown, f"{len(cached[0]):,}", cache)
        images, skipped = cached
    else:
        log.info("no valid cache for %s: decoding it", shown)
        images, skipped = _decode_into_cache(catalog, size, cache)
    report_skipped(catalog, skipped)
    return images


def report_skipped(catalog: Catalog, skipped: list[str]) -> None:
    """One warning naming the files left out by listing (catalog.skipped) and by decoding (`skipped`), if any."""
    skipped = catalog.skipped + skipped
    if skipped:
        named = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3:,} more" if len(skipped) > 3 else "")
        log.warning(
            "skipped %s of %s files in %s that are not readable images: %s",
            f"{len(skipped):,}",
            f"{catalog.listed:,}",
            catalog.source.split(":", 1)[1],
            named,
        )


def _decode_into_cache(catalog: Catalog, size: int, cache: Path) -> tuple[ImageSet, list[str]]:
    """Decode straight into a temp .npy beside the cache (never the whole set in memory), then rename it into place;
    when the cache folder cannot be written, into memory with a warning."""
    n = len(catalog)
    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(cache)
        out = _new_npy(tmp, (n, 3, size, size))
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        tmp = None
        log.warning(
            "cannot write the image cache in %s (%s): continuing without it (point --cache-dir at a writable folder)",
            cache.parent,
            short_reason(e),
        )
        out = np.empty((n, 3, size, size), np.uint8)
    try:
        errors = _decode_all(catalog, size, out, tmp)
        keep = [i for i, e in enumerate(errors) if e is None]
        skipped = [f"{catalog.ids[i]} ({e})" for i, e in enumerate(errors) if e is not None]
        if not keep:
            raise InputError(
                f"no readable images in {catalog.source.split(':', 1)[1]} ({', '.join(skipped[:3])}): "
                "use files Pillow can read (png, jpg, bmp, tiff, webp, ...)"
            )
        labels = None if catalog.labels is None else catalog.labels[keep]
        meta = {"ids": [catalog.ids[i] for i in keep], "labels": None if labels is None else labels.tolist(),
                "class_names": catalog.class_names, "skipped": skipped}  # fmt: skip
        if tmp is None:
            pixels = out if len(keep) == n else out[keep]
            return _image_set(pixels, meta, catalog.source), skipped
        if len(keep) < n:  # copy the good rows into a file of their own size, in ~64 MB chunks
            compact_tmp = _temp_beside(cache)
            compact = _new_npy(compact_tmp, (len(keep), 3, size, size))
            step = max(1, 2**26 // (3 * size * size))
            for j in range(0, len(keep), step):
                compact[j : j + step] = out[keep[j : j + step]]
            del out
            tmp.unlink()
            out, tmp = compact, compact_tmp
        meta = {**meta, "shape": list(out.shape), "chunks": _chunk_digests(out)}
        meta["check"] = _sidecar_digest(meta)
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, cache)
        tmp = None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    try:
        _write_sidecar(cache, meta)
    except OSError as e:  # the images are in place; without their sidecar the next run decodes again
        log.warning("cannot write the image cache's sidecar beside %s (%s)", cache, short_reason(e))
    return _image_set(np.load(cache, mmap_mode="r"), meta, catalog.source), skipped


def _temp_beside(path: Path) -> Path:
    """An empty temp file beside `path`, with the permissions `path` will have (mkstemp alone gives 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode(path))
    finally:
        os.close(fd)
    return Path(tmp)


def _new_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A writable memory-mapped uint8 .npy of `shape`, its blocks allocated now: a full disk is an OSError here,
    not a SIGBUS in the middle of decoding."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "rb+") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return out


PROCESS_MIN = 2000  # images from which a cache is decoded by processes (fewer: threads; a pool's start costs more)
_CHUNK = 256  # images per task of the process pool


def _decode_all(catalog: Catalog, size: int, out: np.ndarray, target: Path | None = None) -> list[str | None]:
    """Decode image i into out[i]; the reason per image that failed. Into a cache file (`target`, memory-mapped as
    `out`) on several cores, forked processes decode chunks into their own mapping of it: Pillow's Python-level
    parsing holds the GIL, so threads barely scale (50,000 CIFAR JPEGs: 23 s on 16 threads of the H100 machine).
    Else, or when the pool breaks, a thread pool (Pillow releases the GIL while decoding)."""
    workers = os.cpu_count() or 1
    shown = catalog.source.split(":", 1)[1]
    n = len(catalog)
    # fork on Linux only: macOS's system libraries are not fork-safe (Python spawns there by default)
    forked = target is not None and workers > 1 and n >= PROCESS_MIN and sys.platform.startswith("linux")
    log.info("decoding %s images from %s (%d %s)", f"{n:,}", shown, workers, "processes" if forked else "threads")
    start = last = time.monotonic()
    errors: list[str | None] = []

    def progress(done: int) -> None:
        nonlocal last
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("decoded %s / %s images", f"{done:,}", f"{n:,}")

    if forked:
        chunks = [range(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]
        try:  # fork: the children inherit the catalogue (nothing is pickled) and run Pillow and numpy only
            with ProcessPoolExecutor(workers, mp.get_context("fork"), _start_worker, (catalog, size, target)) as pool:
                for part in pool.map(_decode_chunk, chunks):
                    errors += part
                    progress(len(errors))
        except BrokenProcessPool:  # a decoder crashed a worker (or it was killed): decode with threads instead
            log.warning("a decoding process ended abruptly: decoding %s with threads instead", shown)
            errors = []
            forked = False
    if not forked:

        def work(i: int) -> str | None:
            return _decode_one(catalog, i, size, out)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for error in pool.map(work, range(n)):
                errors.append(error)
                progress(len(errors))
    log.info("decoded %s images in %.1f s", f"{sum(e is None for e in errors):,}", time.monotonic() - start)
    return errors


def _decode_one(catalog: Catalog, i: int, size: int, out: np.ndarray) -> str | None:
    """Image i into out[i]: None, or why it cannot be read (one bad file is skipped and reported, not fatal)."""
    try:
        out[i] = decode(io.BytesIO(catalog.read(i)), size, catalog.suffix[i]).transpose(2, 0, 1)
        return None
    except Exception as e:  # any reader or decoder error
        return unreadable(e)


_worker: tuple[Catalog, int, np.ndarray] | None = None  # a decoding process's catalogue, size and cache mapping


def _start_worker(catalog: Catalog, size: int, target: Path) -> None:
    global _worker
    _worker = (catalog, size, np.load(target, mmap_mode="r+"))


def _decode_chunk(rows: range) -> list[str | None]:
    assert _worker is not None
    catalog, size, out = _worker
    return [_decode_one(catalog, i, size, out) for i in rows]


def _image_set(pixels: np.ndarray, meta: dict, source: str) -> ImageSet:
    with warnings.catch_warnings():  # a read-only memory map: torch warns that it is not writable (it is never written)
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(pixels)
    labels = None if meta["labels"] is None else torch.tensor(meta["labels"], dtype=torch.int64)
    return ImageSet(images, labels, list(meta["class_names"]), list(meta["ids"]), source)


_CHUNK_BYTES = 1 << 24  # the images are checked in chunks of 16 MiB, hashed on every core


def _chunk_digests(pixels: np.ndarray) -> list[str]:
    """SHA-256 of each chunk of ~16 MiB of rows, hashed by one thread per core (hashlib releases the GIL)."""
    rows = max(1, _CHUNK_BYTES // max(1, pixels[0].nbytes))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda j: hashlib.sha256(pixels[j : j + rows]).hexdigest(), range(0, len(pixels), rows)))


def _sidecar_digest(meta: dict) -> str:
    """SHA-256 of the sidecar but its own 'check' (so of the ids, labels, shape and chunk digests)."""
    text = json.dumps({k: v for k, v in meta.items() if k != "check"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(path: Path, source: str) -> tuple[ImageSet, list[str]] | None:
    """The cached decode (images memory-mapped read-only) and its skipped files, or None when absent, unreadable,
    without a checksum or not matching it (each of those with a warning)."""
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
        pixels = np.load(path, mmap_mode="r", allow_pickle=False)
        if not all(isinstance(meta.get(k), list) for k in ("ids", "class_names", "skipped")):
            raise ValueError("its sidecar lacks ids, class_names or skipped")
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3 or 0 in pixels.shape:
            raise ValueError(f"its images are {pixels.dtype} {tuple(pixels.shape)}, not uint8 (N, 3, H, W)")
        labels = meta.get("labels")
        if len(meta["ids"]) != len(pixels) or (labels is not None and len(labels) != len(pixels)):
            raise ValueError("its arrays have different lengths")
        if labels is not None and not all(
            isinstance(y, int) and 0 <= y < len(meta["class_names"]) for y in labels
        ):
            raise ValueError("its labels are not indices of its class names")
        if "check" not in meta:
            log.warning("ignoring the cache %s: it has no checksum (an older crlf wrote it): decoding again", path)
            return None
        start = time.monotonic()
        intact = meta["check"] == _sidecar_digest(meta) and meta.get("shape") == list(pixels.shape)
        if not (intact and meta.get("chunks") == _chunk_digests(pixels)):
            log.warning("ignoring the damaged cache %s (it does not match its checksum): decoding again", path)
            return None
        log.info("checked the cache's checksums (%.0f MB) in %.1f s", pixels.nbytes / 1e6, time.monotonic() - start)
        return _image_set(pixels, meta, source), list(meta["skipped"])
    except Exception as e:  # a damaged cache is only a miss
        log.warning("ignoring the unreadable cache %s (%s): decoding again", path, short_reason(e))
        return None


def _write_sidecar(cache: Path, meta: dict) -> None:
    """The sidecar, atomically, after the images; then drop older caches of the same catalogue and size."""
    text = json.dumps(meta)
    atomic_write(cache.with_suffix(".json"), lambda f: f.write(text.encode()))
    for old in cache.parent.glob(cache.stem.rsplit("-", 1)[0] + "-*"):
        if old.suffix in (".npy", ".json") and old.stem != cache.stem:
            with contextlib.suppress(OSError):
                old.unlink()
    log.info("cached the decoded images in %s", cache)
