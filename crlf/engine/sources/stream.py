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

from crlf.engine.augment import Crops, Views, empty
from crlf.engine.sources.base import Catalog
from crlf.engine.sources.feed import Feed
from crlf.engine.sources.images import crop_boxes, cut_box, decode, decode_crops, orientation, printable, unreadable
from crlf.errors import RunError

log = logging.getLogger(__name__)

TRIES = 16  # an image and the next 15 in catalogue order all unreadable: the data set is broken, stop
_JPEG = (".jpg", ".jpeg")


class _Decoder(torch.utils.data.Dataset):
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


class _Steps(torch.utils.data.Sampler):
    """The batches of the current epoch, set by the feed before each pass (workers stay up between passes)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamFeed(Feed):
    """A catalogued split, streamed: batches of pre-cut views (augment.Crops) in the loop's order."""

    def __init__(
        self, catalog: Catalog, size: int, plan: list[tuple[int, float, float]], seed: int, device: torch.device,
        workers: int | None = None, gpu_decode: bool = False,
        recipe: Callable[[Crops, torch.Generator], list[torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        self.catalog, self.size, self.plan, self.device = catalog, size, plan, device
        self.source = catalog.source
        self.labels = None if catalog.labels is None else torch.from_numpy(catalog.labels)
        self.gpu = gpu_decode and device.type == "cuda"
        self.decoder = _Decoder(catalog, plan, seed, self.gpu, recipe if device.type == "cpu" else None)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.sampler = _Steps()
        self.loader: torch.utils.data.DataLoader | None = None
        self.bad: list[str] = []
        how = "; JPEGs decoded on the GPU" if self.gpu else ""
        how += "; they augment too (CPU)" if self.decoder.recipe is not None else ""
        log.info("streaming with %d decoding processes%s", self.workers, how)

    def __len__(self) -> int:
        return len(self.catalog)

    def _loader(self) -> torch.utils.data.DataLoader:
        if self.loader is None:
            extra: dict[str, Any] = {}
            if self.workers > 0:  # spawn: a forked child of a process whose OpenMP threads ran can hang
                ahead = 2 if self.decoder.recipe is not None else 4  # float views are 4x the bytes of uint8 crops
                extra = {"multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": ahead,
                         "worker_init_fn": _exit_quietly}  # fmt: skip
            self.loader = torch.utils.data.DataLoader(
                self.decoder, batch_sampler=self.sampler, num_workers=self.workers, collate_fn=_as_is,
                pin_memory=self.device.type == "cuda", **extra,
            )  # fmt: skip
        return self.loader

    def batches(
        self, epoch: int, perm: torch.Tensor, first: int, steps: int, batch_size: int, rank: int, share: int
    ) -> Iterator[Crops | Views]:
        order = perm.cpu().tolist()
        self.sampler.batches = [
            [(epoch, i) for i in order[step * batch_size + rank * share :][:share]] for step in range(first, steps)
        ]
        for out in self._loader():
            if "failed" in out:
                raise RunError(
                    f"{TRIES} images in a row from {printable(out['failed'])} on in {self.source} cannot be read: "
                    "check the data (the log names the unreadable images)"
                )
            self.bad += out["bad"]
            if out["augmented"]:
                yield Views(out["views"])
                continue
            views = [v.to(self.device, non_blocking=True) for v in out["views"]]
            if out["jpegs"]:
                self._decode_on_device(out["jpegs"], views)
            yield Crops([v.contiguous() for v in views])

    def _decode_on_device(self, jpegs: list[tuple[int, torch.Tensor, np.ndarray]], views: list[torch.Tensor]) -> None:
        """Decode the batch's JPEGs in one call on the device, then cut and resize each view's box there. They are
        stored upright (the workers keep the others): torchvision ignores apply_exif_orientation on CUDA."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [j[1] for j in jpegs]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        for (row, _, boxes), image in zip(jpegs, decoded):
            for v, ((side, _, _), box) in enumerate(zip(self.plan, boxes)):
                views[v][row] = cut_box(image, box, side)

    def head(self, count: int) -> torch.Tensor:
        return self._decode_rows(range(min(count, len(self.catalog))))

    def spaced(self, count: int) -> torch.Tensor:
        count = min(count, 512)
        return self._decode_rows(range(0, len(self.catalog), max(1, len(self.catalog) // count))[:count])

    def _decode_rows(self, rows: range) -> torch.Tensor:
        """Centre crops of the readable images among `rows` (decoding thousands at start-up would take long)."""
        out = []
        for i in rows:
            try:
                out.append(decode(io.BytesIO(self.catalog.read(i)), self.size, self.catalog.suffix[i]))
            except Exception:  # noqa: S112 - unreadable images are counted while training; the sample just skips them
                continue
        if not out:
            raise RunError(f"none of {len(rows)} images sampled from {self.source} can be read: check the data")
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

    def skipped(self) -> list[str]:
        bad, self.bad = self.bad, []
        return bad

    def close(self) -> None:
        self.loader = None  # the DataLoader's iterator shuts its workers down when collected
