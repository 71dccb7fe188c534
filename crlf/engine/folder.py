"""The 'folder' source: a tree of images decoded once (thread pool) and cached while its files are unchanged."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from crlf.engine.data import ImageSet, short_reason
from crlf.engine.files import atomic_write
from crlf.errors import InputError

log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # bump when folder decoding changes, so old caches are not reused (2: printable ids)

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: str, backslashes: bool = True) -> str:
    """A file name as one printable line that encodes to UTF-8, for log lines, ids, caches and JSON.

    A name whose characters are all printable and that holds no backslash is returned as it is. Otherwise
    backslashes are doubled, newline, CR and tab become \\n, \\r, \\t, and every other unprintable character
    (controls, line separators, the undecodable bytes that os.scandir hands over as lone surrogates) is
    written as the \\xNN escapes of its bytes: b"bad\\xff.png" -> 'bad\\xff.png'. Distinct names never
    print alike. With backslashes=False (for messages that already quote names, such as exception texts)
    backslashes are kept as they are.
    """
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(_escape(c) if not c.isprintable() or (c == "\\" and backslashes) else c for c in name)


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    try:
        raw = c.encode("utf-8", "surrogateescape")  # an undecodable byte: the byte itself
    except UnicodeEncodeError:
        raw = c.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in raw)


@functools.cache
def _formats_for(suffix: str) -> tuple[str, ...]:
    """Pillow formats to try on a file, its suffix's own first (guesses cost time).

    () for non-image suffixes; no EPS (Ghostscript)."""
    Image.init()
    readable, own = [f for f in Image.OPEN if f != "EPS"], Image.registered_extensions().get(suffix)
    return () if suffix and own not in readable else tuple(sorted(readable, key=lambda f: f != own))


def _cache_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured.expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crlf"


def load_folder(data_dir: Path, split: str, size: int, cache_dir: Path | None = None) -> ImageSet:
    """A tree of images (class sub-folders give labels) decoded to size x size, cached while its files are unchanged."""
    base = data_dir.resolve()
    if not base.is_dir():
        raise InputError(
            f"{printable(str(data_dir))} does not exist or is not a folder: point --data-dir at a folder of images"
        )
    root = base / split if (base / split).is_dir() else base
    if root == base and split != "train":
        raise InputError(
            f"{printable(str(data_dir))} has no {split}/ sub-folder: use a folder that has {split}/ in it"
            + (", or give the test images with --test-data-dir FOLDER" if split == "test" else ", or --split train")
        )
    shown = printable(str(root))
    files, unusable = _scan(root)
    if not files:
        if unusable:
            raise InputError(f"no readable images in {shown} ({', '.join(unusable[:3])}): put image files in it")
        raise InputError(f"{shown} is empty: put images in it (one sub-folder per class gives labels)")
    where = hashlib.sha256(json.dumps([str(root), split, size, _CACHE_VERSION]).encode()).hexdigest()[:16]
    cache = _cache_dir(cache_dir) / f"folder-{where}-{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}.npz"
    cached = _read_cache(cache, f"folder:{shown}")
    if cached is not None:
        log.info("using the cached decode of %s (%s images): %s", shown, f"{len(cached[0]):,}", cache)
        images, skipped = cached
    else:
        log.info("no valid cache for %s: decoding it", shown)
        images, skipped = _decode_folder(base, root, [f[0] for f in files], size)
        _write_cache(cache, images, skipped)
    skipped = unusable + skipped
    if skipped:
        named = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3:,} more" if len(skipped) > 3 else "")
        log.warning(
            "skipped %s of %s files in %s that are not readable images: %s",
            f"{len(skipped):,}",
            f"{len(files) + len(unusable):,}",
            shown,
            named,
        )
    return images


def _scan(root: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Every non-hidden file under root as (posix path relative to root, size, mtime_ns), sorted; and, sorted,
    'name (reason)' for each entry that cannot be used: a broken link, a symlink loop, a folder that cannot be
    listed, an entry whose stat() fails, something that is not a regular file (a FIFO would block).

    Links are followed, to files and to folders alike (a linked class folder counts as a class). A link to
    a folder that the walk is already inside of (an ancestor, or the folder itself) would cycle: it is
    skipped as a symlink loop, so the walk always ends. Two links to the same folder give its images twice.
    """
    found: list[tuple[str, int, int]] = []
    unusable: list[str] = []
    try:
        top = root.stat()
        stack = [(root, frozenset({(top.st_dev, top.st_ino)}))]
        while stack:
            folder, inside = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as e:
                if folder == root:
                    raise
                unusable.append(f"{printable(folder.relative_to(root).as_posix())}/ ({_why(e)})")
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                rel = Path(e.path).relative_to(root).as_posix()
                try:
                    st = e.stat()  # follows links
                except OSError as err:
                    unusable.append(f"{printable(rel)} ({_why(err, link=_is_link(e))})")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in inside:
                        unusable.append(f"{printable(rel)} (symlink loop)")
                    else:
                        stack.append((Path(e.path), inside | {(st.st_dev, st.st_ino)}))
                elif stat.S_ISREG(st.st_mode):
                    found.append((rel, st.st_size, st.st_mtime_ns))
                else:
                    unusable.append(f"{printable(rel)} (not a regular file)")
    except OSError as e:
        raise InputError(
            f"cannot list {printable(str(root))} ({_why(e)}): check the path and its permissions"
        ) from None
    return sorted(found), sorted(unusable)


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _why(e: OSError, link: bool = False) -> str:
    """The reason an entry was skipped, without its path: 'broken link', 'symlink loop', 'Permission denied'."""
    if e.errno == errno.ENOENT and link:
        return "broken link"  # the link is there (scandir listed it); what it points to is not
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return printable(e.strerror or short_reason(e), backslashes=False)


def _decode_folder(base: Path, root: Path, rels: list[str], size: int) -> tuple[ImageSet, list[str]]:
    """Decode the image files with a thread pool; also returns 'path (reason)' for each skipped file.

    Ids, class names and the skipped list hold printable() names, so they survive UTF-8 logs, caches and JSON.
    """
    shown = printable(str(root))
    is_image = [bool(_formats_for(Path(r).suffix.lower())) for r in rels]
    skipped = [f"{printable(r)} (not an image)" for r, ok in zip(rels, is_image) if not ok]
    candidates = [r for r, ok in zip(rels, is_image) if ok]
    classes = sorted({r.split("/", 1)[0] for r in candidates if "/" in r})
    if classes:
        skipped += [f"{printable(r)} (not in a class folder)" for r in candidates if "/" not in r]
        candidates = [r for r in candidates if "/" in r]
    out = np.empty((len(candidates), 3, size, size), np.uint8)

    def work(i: int) -> str | None:
        try:
            out[i] = decode(root / candidates[i], size).transpose(2, 0, 1)
            return None
        except Exception as e:  # one bad file (any decoder error) is skipped and reported, not fatal
            return printable(short_reason(e), backslashes=False)

    workers = os.cpu_count() or 1
    log.info("decoding %s images from %s (%d threads)", f"{len(candidates):,}", shown, workers)
    start = last = time.monotonic()
    errors: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for error in pool.map(work, range(len(candidates))):
            errors.append(error)
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("decoded %s / %s images", f"{len(errors):,}", f"{len(candidates):,}")
    skipped += [f"{printable(r)} ({e})" for r, e in zip(candidates, errors) if e is not None]
    keep = [i for i, e in enumerate(errors) if e is None]
    if not keep:
        raise InputError(
            f"no readable images in {shown} ({', '.join(skipped[:3])}): "
            "use files Pillow can read (png, jpg, bmp, tiff, webp, ...)"
        )
    log.info("decoded %s images in %.1f s", f"{len(keep):,}", time.monotonic() - start)
    kept, index = [candidates[i] for i in keep], {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[r.split("/", 1)[0]] for r in kept]) if classes else None
    ids = [printable((root.relative_to(base) / r).as_posix()) for r in kept]
    return ImageSet(
        torch.from_numpy(out if len(keep) == len(out) else out[keep]),
        labels,
        [printable(c) for c in classes],
        ids,
        f"folder:{shown}",
    ), skipped


def decode(
    source: Path | BinaryIO, size: int, suffix: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """One image file or file object (an upload) -> uint8 (size, size, 3): RGB, upright, shorter side scaled to
    size, center-cropped. The folder source's guards: only the Pillow formats the suffix allows (default: the
    path's; none for a non-image suffix, no EPS) and Pillow's decompression-bomb check; with max_pixels, an
    InputError for an image of more pixels, before they are decoded."""
    if suffix is None:
        suffix = Path(source).suffix if isinstance(source, (str, Path)) else ""
    with Image.open(source, formats=_formats_for(suffix.lower())) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise InputError(f"the image has {im.width}x{im.height} pixels, more than the {max_pixels:,} allowed")
        return square(im, size)


def square(im: Image.Image, size: int) -> np.ndarray:
    """An opened image -> uint8 (size, size, 3) exactly as the folder source decodes files (the Encoder's PIL input
    goes through here too, so its rows equal extract's)."""
    im.draft(None, (size, size))  # JPEG: decode at a reduced scale that is still >= size (a no-op for other formats)
    if "exif" in im.info or im.format == "TIFF":
        im = ImageOps.exif_transpose(im)
    rgb = _to_rgb(im)
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; 16/32-bit integer grey is scaled to 8 bit, transparency composited on white."""
    if im.mode.startswith("I"):
        grey = np.clip(np.asarray(im).astype(np.float32), 0, 65535) / 257
        return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _read_cache(path: Path, source: str) -> tuple[ImageSet, list[str]] | None:
    """The cached decode of a folder and its skipped files, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = torch.from_numpy(z["labels"]) if "labels" in z.files else None
            images = ImageSet(
                torch.from_numpy(z["images"]), labels, z["class_names"].tolist(), z["ids"].tolist(), source
            )
            skipped = z["skipped"].tolist()
        if len(images.ids) != len(images) or (labels is not None and len(labels) != len(images)):
            raise ValueError("its arrays have different lengths")
        x = images.images
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or 0 in x.shape:
            raise ValueError(f"its images are {x.dtype} {tuple(x.shape)}, not uint8 (N, 3, H, W)")
        if (
            labels is not None
            and len(labels)
            and (labels.dtype != torch.int64 or int(labels.min()) < 0 or int(labels.max()) >= len(images.class_names))
        ):
            raise ValueError("its labels are not indices of its class names")
        return images, skipped
    except Exception as e:  # a damaged cache is only a miss
        log.warning("ignoring the unreadable cache %s (%s): decoding again", path, short_reason(e))
        return None


def _write_cache(path: Path, images: ImageSet, skipped: list[str]) -> None:
    """Save the decode atomically (temp file, fsync, rename) and drop older caches of the same folder."""
    arrays = {
        "images": images.images.numpy(),
        **{
            k: np.array(v, dtype=np.str_)
            for k, v in (("class_names", images.class_names), ("ids", images.ids), ("skipped", skipped))
        },
    }
    if images.labels is not None:
        arrays["labels"] = images.labels.numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        for old in path.parent.glob(path.stem.rsplit("-", 1)[0] + "-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        log.info("cached the decoded images in %s", path)
    except OSError as e:
        log.warning(
            "cannot write the image cache in %s (%s): continuing without it (point --cache-dir at a writable folder)",
            path.parent,
            short_reason(e),
        )
