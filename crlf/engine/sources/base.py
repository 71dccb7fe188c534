"""What every data source shares: ImageSet (a split in memory), Catalog (a split listed, not decoded), the registry.

A source is a reader registered under its ``--data`` name. Every source can ``read`` a split into an ImageSet; the
ones that can stream (folder, tar) can also ``list`` it as a Catalog, whose images are decoded on the fly. What to
read is a DataSpec: the data layer's own plain config (the command layer builds it from its validated settings).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Which images to read and how (the fields and defaults of the CLI's --data options; checked there, not here)."""

    data: str = "digits"  # a registered source
    data_dir: Path | None = None
    split: str | None = None  # None: the source's training split (Source.split)
    image_size: int | None = None  # None: the source's own (Source.default_size)
    limit: int | None = None  # a seeded random subset of this many images
    download: bool = True
    cache_dir: Path | None = None  # of decoded folders / shards (None: the user's cache folder)
    test_data_dir: Path | None = None  # the test split of folder / npy / npz / tar data
    stream: bool | None = None  # None: stream when the decoded set does not fit in memory
    workers: int | None = None  # decoding processes when streaming (None: the CPU count)
    gpu_decode: bool = False


@dataclass
class ImageSet:
    """A whole data set in memory: uint8 images (N, 3, H, W), optional int64 labels and one id per row.

    ``images`` may be backed by a read-only memory-mapped cache file (the folder and tar caches): index it, never
    write into it."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    ids: list[str]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor | list[int]) -> ImageSet:
        """The rows at ``indices``, in that order (class names and source are kept)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(
            self.images[idx].contiguous(),
            labels,
            list(self.class_names),
            [self.ids[i] for i in idx.tolist()],
            self.source,
        )


@dataclass
class Catalog:
    """The images of a split listed without decoding them: image i is the bytes at offset[i] of file
    files[file[i]] (size[i] bytes; -1: the whole file). A folder is one file per image, tar shards many per file."""

    files: list[str]
    file: np.ndarray  # int64 (N,): which of `files`
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int64 (N,)
    suffix: list[str]  # each image's file extension ('.jpg'): the decoder tried first
    ids: list[str]
    labels: np.ndarray | None  # int64 (N,)
    class_names: list[str]
    source: str
    identity: str  # what the catalog is (root and split, or the shard list): part of the cache key
    fingerprint: str  # changes when any listed file changes (names, sizes, modification times)
    skipped: list[str] = field(default_factory=list)  # 'name (reason)' of what listing left out
    listed: int = 0  # entries looked at (images, non-images and unusable ones), for the skipped warning

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int, handles: dict[int, object] | None = None) -> bytes:
        """The encoded bytes of image i; `handles` keeps shard files open between calls (one process's own)."""
        k, offset, size = int(self.file[i]), int(self.offset[i]), int(self.size[i])
        if size < 0:
            with open(self.files[k], "rb") as f:
                return f.read()
        if handles is None:
            with open(self.files[k], "rb") as f:
                return os.pread(f.fileno(), size, offset)
        if k not in handles:
            handles[k] = open(self.files[k], "rb")  # noqa: SIM115 - kept open for the next members of the shard
        return os.pread(handles[k].fileno(), size, offset)  # type: ignore[attr-defined]

    def subset(self, rows: list[int]) -> Catalog:
        """The images at `rows`, in that order; its identity names the rows, so its decode is cached apart from the
        whole split's (a --limit run neither reads the whole split's cache nor leaves its subset in its place)."""
        idx = np.asarray(rows, dtype=np.int64)
        identity = f"{self.identity} rows {hashlib.sha256(idx.tobytes()).hexdigest()[:16]}"
        return Catalog(self.files, self.file[idx], self.offset[idx], self.size[idx], [self.suffix[i] for i in rows],
                       [self.ids[i] for i in rows], None if self.labels is None else self.labels[idx],
                       self.class_names, self.source, identity, self.fingerprint, self.skipped,
                       self.listed)  # fmt: skip


@dataclass(frozen=True)
class Request:
    """One split of one source, as load() asks a reader for it."""

    spec: DataSpec
    split: str
    path: Path | None  # --data-dir, or --test-data-dir when that is the split asked for
    own_test: bool  # `path` came from --test-data-dir: it is the test split itself
    size: int | None  # the side the images end up at (None: the source's own)


@dataclass(frozen=True)
class Source:
    """A registered data source: `read` loads a split into memory; `list` (streaming sources) catalogues it;
    `split` is the one read when none is asked."""

    read: Callable[[Request], ImageSet]
    default_size: int | None = None
    list: Callable[[Request], Catalog] | None = None
    split: str = "train"
    path: str | None = None  # what --data-dir must name ("folder", "file", "shards"); None: optional, no test path
    about: str = ""  # a few words for --data's help


REGISTRY: dict[str, Source] = {}


def register(
    name: str, default_size: int | None = None, list: Callable[[Request], Catalog] | None = None,  # noqa: A002
    split: str = "train", path: str | None = None, about: str = "",
) -> Callable[[Callable[[Request], ImageSet]], Callable[[Request], ImageSet]]:
    """Decorator of a reader: make it available as ``--data NAME`` (`path`: what its required --data-dir names;
    such a source takes --test-data-dir; `list`: it can stream; then python -m crlf.engine.registries)."""

    def add(read: Callable[[Request], ImageSet]) -> Callable[[Request], ImageSet]:
        REGISTRY[name] = Source(read, default_size, list, split, path, about)
        return read

    return add


def pick(n: int, limit: int | None, seed: int = 0) -> torch.Tensor | None:
    """Indices of a seeded random subset of ``limit`` of n rows, in original order (None: keep all)."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Center-crop to square and resize with antialiased bilinear, in float chunks of ~64 MB; uint8 stays uint8
    (rounded), float stays float (the Encoder's float input)."""
    n, _, h, w = images.shape
    side = min(h, w)
    src = images[:, :, (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    if n > 1:
        log.info("resizing %s images from %dx%d to %dx%d", f"{n:,}", h, w, size, size)
    uint8 = images.dtype == torch.uint8
    out = torch.empty((n, 3, size, size), dtype=torch.uint8 if uint8 else torch.float32)
    chunk = max(1, 2**24 // (3 * max(side, size) ** 2))
    for i in range(0, n, chunk):
        x = F.interpolate(
            src[i : i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8) if uint8 else x
    return out


def split_ids(split: str, n: int) -> list[str]:
    """Row ids of a source without file names: 'train/0', 'train/1', ..."""
    return [f"{split}/{i}" for i in range(n)]

