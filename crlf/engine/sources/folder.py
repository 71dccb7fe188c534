"""The 'folder' source: a tree of images (class sub-folders give labels), listed for streaming or decoded once into
a memory-mapped cache (sources.cache)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from crlf.engine.sources.base import Catalog, ImageSet, Request, register
from crlf.engine.sources.cache import load_catalog
from crlf.engine.sources.images import formats_for, printable
from crlf.errors import InputError, short_reason


def list_folder(req: Request) -> Catalog:
    """The images of the folder's split, listed (not decoded): non-images and files outside the class folders are
    left out and named in `skipped`."""
    assert req.path is not None  # the settings (DataSettings) require a path for folder data
    data_dir, split = req.path, "train" if req.own_test else req.split
    base = data_dir.resolve()
    if not base.is_dir():
        raise InputError(
            f"'{printable(str(data_dir))}' does not exist or is not a folder: point --data-dir at a folder of images"
        )
    root = base / split if (base / split).is_dir() else base
    if root == base and split != "train":
        raise InputError(
            f"'{printable(str(data_dir))}' has no {split}/ sub-folder: use a folder that has {split}/ in it"
            + (", or give the test images with --test-data-dir FOLDER" if split == "test" else ", or --split train")
        )
    shown = printable(str(root))
    files, unusable = _scan(root)
    if not files:
        if unusable:
            raise InputError(f"no readable images in {shown} ({', '.join(unusable[:3])}): put image files in it")
        raise InputError(f"'{shown}' is empty: put images in it (one sub-folder per class gives labels)")
    rels = [f[0] for f in files]
    is_image = [bool(formats_for(Path(r).suffix.lower())) for r in rels]
    skipped = [f"{printable(r)} (not an image)" for r, ok in zip(rels, is_image) if not ok]
    candidates = [r for r, ok in zip(rels, is_image) if ok]
    classes = sorted({r.split("/", 1)[0] for r in candidates if "/" in r})
    if classes:
        skipped += [f"{printable(r)} (not in a class folder)" for r in candidates if "/" not in r]
        candidates = [r for r in candidates if "/" in r]
    if not candidates:
        raise InputError(
            f"no readable images in {shown} ({', '.join(skipped[:3])}): "
            "use files Pillow can read (png, jpg, bmp, tiff, webp, ...)"
        )
    index = {name: i for i, name in enumerate(classes)}
    n = len(candidates)
    return Catalog(
        files=[str(root / r) for r in candidates],
        file=np.arange(n, dtype=np.int64),
        offset=np.zeros(n, np.int64),
        size=np.full(n, -1, np.int64),
        suffix=[Path(r).suffix.lower() for r in candidates],
        ids=[printable((root.relative_to(base) / r).as_posix()) for r in candidates],
        labels=np.array([index[r.split("/", 1)[0]] for r in candidates], np.int64) if classes else None,
        class_names=[printable(c) for c in classes],
        source=f"folder:{shown}",
        identity=json.dumps(["folder", str(root), split]),
        fingerprint=hashlib.sha256(json.dumps(files).encode()).hexdigest(),
        skipped=unusable + skipped,
        listed=len(files) + len(unusable),
    )


@register("folder", 64, list=list_folder, path="folder", about="a tree of images")
def read_folder(req: Request) -> ImageSet:
    """--data folder in memory: decoded once at the image size, then read from the memory-mapped cache."""
    assert req.size is not None
    return load_catalog(list_folder(req), req.size, req.spec.cache_dir)


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

