"""Un-augmented images for embedding (extract, the evaluations, visualize): the whole set in memory, or streamed.

Streaming, worker processes decode each image exactly as the in-memory folder / tar path does (images.decode: upright,
shorter side scaled to the size, centre crop) and hand over uint8 batches in catalogue order, so the rows an encoder
makes of them equal the in-memory path's. Unreadable images are skipped and reported, never replaced: one row per
readable image, with its id and label.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from crlf.engine.sources import REGISTRY, catalog, load
from crlf.engine.sources.base import Catalog, DataSpec, ImageSet, pick
from crlf.engine.sources.cache import load_catalog, report_skipped
from crlf.engine.sources.feed import streams
from crlf.engine.sources.images import decode, unreadable
from crlf.errors import InputError
from crlf.typed import config_of

log = logging.getLogger(__name__)


class _Squares(torch.utils.data.Dataset):
    """The worker side: catalogue rows -> uint8 (B, 3, S, S) of the readable ones, their rows, and 'id (reason)' of
    the others."""

    def __init__(self, listed: Catalog, size: int):
        self.catalog, self.size = listed, size
        self.handles: dict[int, Any] = {}  # this process's open shards

    def __len__(self) -> int:
        return len(self.catalog)

    def __getitems__(self, rows: list[int]) -> dict[str, Any]:
        out = np.empty((len(rows), 3, self.size, self.size), np.uint8)  # NCHW as the cache: the same conv kernels
        kept: list[int] = []
        bad: list[str] = []
        for i in rows:
            try:
                out[len(kept)] = decode(io.BytesIO(self.catalog.read(i, self.handles)), self.size,
                                        self.catalog.suffix[i]).transpose(2, 0, 1)  # fmt: skip
                kept.append(i)
            except Exception as e:  # as the cache's decode: one bad file is skipped and reported, not fatal
                bad.append(f"{self.catalog.ids[i]} ({unreadable(e)})")
        return {"images": torch.from_numpy(out[: len(kept)]), "rows": kept, "bad": bad}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class SquareStream:
    """A catalogued split streamed as uint8 (B, 3, S, S) batches in catalogue order; after a full pass, `ids` and
    `labels` are those of the rows it gave (the readable images) and `images` holds them when `keep` was asked."""

    def __init__(self, listed: Catalog, size: int, batch_size: int, workers: int | None = None, keep: bool = False):
        self.catalog, self.size, self.batch_size, self.keep = listed, size, batch_size, keep
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.source, self.class_names = listed.source, listed.class_names
        self.rows: list[int] = []
        self.kept: list[torch.Tensor] = []

    def __len__(self) -> int:
        """Images listed (the rows given after a pass can be fewer: unreadable ones are skipped)."""
        return len(self.catalog)

    def __iter__(self) -> Iterator[torch.Tensor]:
        extra: dict[str, Any] = {}
        if self.workers > 0:  # spawn: a forked child of a process whose OpenMP threads ran can hang
            extra = {"multiprocessing_context": "spawn", "prefetch_factor": 4}
        n = len(self.catalog)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        loader = torch.utils.data.DataLoader(_Squares(self.catalog, self.size), batch_sampler=batches,
                                             num_workers=min(self.workers, len(batches)), collate_fn=_as_is,
                                             **extra)  # fmt: skip
        log.info("streaming %s images from %s with %d decoding processes", f"{n:,}", self.source, loader.num_workers)
        self.rows, self.kept, bad = [], [], []
        for out in loader:
            self.rows += out["rows"]
            bad += out["bad"]
            if len(out["rows"]):
                if self.keep:
                    self.kept.append(out["images"])
                yield out["images"]
        report_skipped(self.catalog, bad)
        if not self.rows:
            raise InputError(
                f"no readable images in {self.source.split(':', 1)[1]} ({', '.join(bad[:3])}): "
                "use files Pillow can read (png, jpg, bmp, tiff, webp, ...)"
            )

    @property
    def ids(self) -> list[str]:
        return [self.catalog.ids[i] for i in self.rows]

    @property
    def labels(self) -> torch.Tensor | None:
        return None if self.catalog.labels is None else torch.from_numpy(self.catalog.labels[self.rows])

    @property
    def images(self) -> torch.Tensor:
        """The rows given, uint8 (N, 3, S, S) (only with keep=True)."""
        assert self.keep, "SquareStream(keep=True) keeps the decoded images"
        return torch.cat(self.kept)


def open_images(
    spec: DataSpec, split: str | None, batch_size: int, sample: tuple[int, int] | None = None,
    keep: bool = False,
) -> ImageSet | SquareStream:  # fmt: skip
    """A split to embed at spec.image_size: in memory, or streamed (--stream, or the set decoded would take more
    than half the available memory; the log says which and why). `sample` (count, seed): a seeded random subset."""
    spec = config_of(DataSpec, spec)
    size = spec.image_size
    assert size is not None, "the caller sets the encoder's image size"
    listed = None
    if REGISTRY[spec.data].list is not None:
        if spec.stream is False:
            log.info("data: in memory (--no-stream): decoded once into a memory-mapped cache")
        else:
            listed = catalog(spec, split)
    how = "each image is decoded in a worker process as it is embedded"
    if listed is None or not streams(spec, listed, size, how):
        # in memory: from the catalogue just listed (listing 50,000 files twice cost seconds), as training reads it
        images = load(spec, split) if listed is None else load_catalog(listed, size, spec.cache_dir)
        rows = None if sample is None else pick(len(images), *sample)
        return images if rows is None else images.subset(rows)
    rows = None if sample is None else pick(len(listed), *sample)
    return SquareStream(listed if rows is None else listed.subset(rows.tolist()), size, batch_size, spec.workers,
                        keep)  # fmt: skip
