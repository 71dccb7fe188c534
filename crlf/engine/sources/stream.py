"""Streaming: images decoded on the fly, each view a random-resized crop of the full-resolution image.

Worker processes (a DataLoader over spawned processes, kept for the whole run) read the encoded bytes (a file, or a
member of a tar shard at a known offset), draw each view's crop box from a generator seeded by (seed, epoch, image),
decode (JPEG at the smallest DCT scale that keeps every box at least its output size), cut and resize the boxes, and
return uint8 views. The device applies the rest of the augmentation batched (augment.Crops); on a CPU the workers
run the method's whole recipe on their batch instead (augment.Views; one torch thread each), so every core augments
rather than the training process alone, its draws seeded by (seed, epoch, the batch's images). An unreadable image
is replaced by the next readable one in catalogue order, the same in every run, and counted.

With --gpu-decode on CUDA the workers only read the bytes and draw the boxes; RGB and gray JPEGs stored upright are
decoded on the GPU in one batched call (torchvision.io.decode_jpeg), cut and resized there. Other images (other
formats, CMYK or EXIF-turned JPEGs) are still decoded in the workers.

This module is the workers' side (Decoder, the DataLoader that runs it); the loop's side is sources.feed.StreamFeed.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from crlf.engine.augment import Crops, empty
from crlf.engine.sources.base import Catalog
from crlf.engine.sources.images import crop_boxes, decode_crops, orientation, unreadable

log = logging.getLogger(__name__)

TRIES = 16  # an image and the next 15 in catalogue order all unreadable: the data set is broken, stop
_JPEG = (".jpg", ".jpeg")


class Decoder(torch.utils.data.Dataset):
    """The worker side: a batch of (epoch, index) -> its views (uint8 (B, 3, S, S) per view of the plan)."""

    def __init__(self, catalog: Catalog, plan: list[tuple[int, float, float]], seed: int, gpu: bool,
                 recipe: Callable[[Crops, torch.Generator], list[torch.Tensor]] | None = None):  # fmt: skip
        self.catalog, self.plan, self.seed, self.gpu, self.recipe = catalog, plan, seed, gpu, recipe
        self.handles: dict[int, Any] = {}  # this process's open shards

    def __len__(self) -> int:
        return len(self.catalog)

    def uniforms(self, epoch: int, index: int) -> np.ndarray:
        """The (views, 4) draws of an image's crop boxes: a pure function of (seed, epoch, index)."""
        return np.random.default_rng([self.seed, epoch, index]).random((len(self.plan), 4))

    def __getitems__(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        alloc = empty if self.recipe is None else torch.empty  # returned as they are: in shared memory
        views = [alloc((len(items), 3, s, s), dtype=torch.uint8) for s, _, _ in self.plan]
        used, bad, jpegs = [], [], []
        for row, (epoch, index) in enumerate(items):
            u = self.uniforms(epoch, index)
            for k in range(TRIES):
                j = (index + k) % len(self.catalog)
                try:
                    data, boxes = self.catalog.read(j, self.handles), None
                    if self.gpu and self.catalog.suffix[j] in _JPEG:
                        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
                            # torchvision.io decodes RGB and gray JPEGs on CUDA but ignores their EXIF orientation:
                            # flipped or turned ones (photos from phones), and CMYK ones, are decoded here
                            if orientation(im) == 1 and im.mode in ("RGB", "L"):
                                boxes = crop_boxes(*im.size, self.plan, u)
                    if boxes is not None:
                        jpegs.append((row, torch.frombuffer(bytearray(data), dtype=torch.uint8), boxes))
                    else:
                        for v, crop in enumerate(decode_crops(data, self.catalog.suffix[j], self.plan, u)):
                            views[v][row] = crop
                    break
                except Exception as e:  # any reader or decoder error: skipped, counted, replaced by the next image
                    bad.append(f"{self.catalog.ids[j]} ({unreadable(e)})")
            else:
                return {"failed": self.catalog.ids[index]}
            used.append(j)
        if self.recipe is not None:  # the batch's draws: a pure function of (seed, epoch, its images)
            state = np.random.SeedSequence([self.seed, *(x for item in items for x in item)]).generate_state(2)
            gen = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
            threads = torch.get_num_threads()  # one, as in a worker (--workers 0 too): the same values either way
            torch.set_num_threads(1)
            try:
                views = [v.contiguous() for v in self.recipe(Crops(views), gen)]
            finally:
                torch.set_num_threads(threads)
        return {
            "views": views,
            "augmented": self.recipe is not None,
            "rows": torch.tensor(used),
            "bad": bad,
            "jpegs": jpegs,
        }


def _exit_quietly(_: int) -> None:
    """A worker leaves with os._exit once Python's own exit handlers start, skipping the C++ static destructors after
    them: one of those, some of the time, aborted a worker that was told to stop ("terminate called without an
    active exception", then "DataLoader worker ... killed by signal: Aborted" in the training process)."""
    atexit.register(_leave)


def _leave() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class Steps(torch.utils.data.Sampler):
    """The batches of the current epoch, set by the feed before each pass (workers stay up between passes)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(decoder: Decoder, sampler: Steps, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """The DataLoader that runs `decoder` on `workers` spawned processes (0: in-process), kept up between epochs."""
    extra: dict[str, Any] = {}
    if workers > 0:  # spawn: a forked child of a process whose OpenMP threads ran can hang
        ahead = 2 if decoder.recipe is not None else 4  # float views are 4x the bytes of uint8 crops
        extra = {"multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": ahead,
                 "worker_init_fn": _exit_quietly}  # fmt: skip
    return torch.utils.data.DataLoader(decoder, batch_sampler=sampler, num_workers=workers, collate_fn=_as_is,
                                       pin_memory=pin, **extra)  # fmt: skip
