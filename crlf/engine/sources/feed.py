"""What the training loop reads: a Feed of uint8 batches (MemoryFeed) or of pre-cut views (StreamFeed, whose workers
are sources.stream's), and the rule that picks one by size.

The loop owns the order: each epoch it draws one permutation from (seed, epoch) and asks the feed for the rows of
steps first..steps-1 that are this process's share. A feed never draws from the loop's generators, so the order, the
crops and a resumed run's next batch depend on (seed, epoch, step) alone.
"""

from __future__ import annotations

import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch

from crlf.engine.augment import Crops, Views
from crlf.engine.sources import REGISTRY, catalog, load, stream
from crlf.engine.sources.base import Catalog, DataSpec, ImageSet
from crlf.engine.sources.cache import load_catalog
from crlf.engine.sources.images import cut_box, decode, printable
from crlf.errors import RunError
from crlf.typed import config_of

log = logging.getLogger(__name__)

FIT = 0.5  # in memory when the decoded set takes at most this fraction of the available memory


class Feed(ABC):
    """N images at `size` px, as batches for the training loop."""

    source: str
    size: int
    labels: torch.Tensor | None
    rows_on: torch.device = torch.device("cpu")  # where the loop draws its permutation (where the images live)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(
        self, epoch: int, perm: torch.Tensor, first: int, steps: int, batch_size: int, rank: int, share: int
    ) -> Iterator[torch.Tensor | Crops | Views]:
        """Steps first..steps-1 of `epoch`: rows perm[step * batch_size + rank * share:][:share], on the device."""

    @abstractmethod
    def head(self, count: int) -> torch.Tensor:
        """The first `count` images (uint8 centre crops at `size`): the probe batch."""

    @abstractmethod
    def spaced(self, count: int) -> torch.Tensor:
        """About `count` evenly spaced images (uint8 centre crops at `size`): the channel statistics."""

    def skipped(self) -> list[str]:
        """'id (reason)' of the unreadable images met since the last call (streaming; in memory they never load)."""
        return []

    def close(self) -> None:
        """Stop worker processes, if any."""
        return None


class MemoryFeed(Feed):
    """A whole ImageSet: on the accelerator when it fits, else in (pinned) host memory or its memory-mapped cache."""

    def __init__(self, images: ImageSet, device: torch.device):
        self.data, self.device = images, device
        self.source, self.size, self.labels = images.source, images.images.shape[-1], images.labels
        self.images = place(images.images, device)
        self.rows_on = self.images.device

    def __len__(self) -> int:
        return len(self.data)

    def batches(
        self, epoch: int, perm: torch.Tensor, first: int, steps: int, batch_size: int, rank: int, share: int
    ) -> Iterator[torch.Tensor]:
        pin = self.images.device.type == "cpu" and self.device.type == "cuda" and not self.images.is_pinned()
        for step in range(first, steps):
            rows = step * batch_size + rank * share
            batch = self.images[perm[rows : rows + share]]
            yield (batch.pin_memory() if pin else batch).to(self.device, non_blocking=True)

    def head(self, count: int) -> torch.Tensor:
        return self.images[:count]

    def spaced(self, count: int) -> torch.Tensor:
        return self.data.images[:: max(1, len(self.data) // count)]


def place(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 data set on the accelerator when it fits comfortably (CIFAR-10 is 150 MB), else pinned host memory
    when that fits, else left where it is (a memory-mapped cache: each batch is gathered and pinned on its own)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < 0.3 * free:
            return images.to(device)
        if images.nbytes < FIT * available_memory():
            log.info("data set (%.1f GB) stays in pinned host memory", images.nbytes / 1e9)
            return images.pin_memory()
        log.info("data set (%.1f GB) is read from its memory-mapped cache, batch by batch", images.nbytes / 1e9)
        return images
    return images.to(device)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown: assume a small machine


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
        self.decoder = stream.Decoder(catalog, plan, seed, self.gpu, recipe if device.type == "cpu" else None)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.sampler = stream.Steps()
        self.loader: torch.utils.data.DataLoader | None = None
        self.bad: list[str] = []
        how = "; JPEGs decoded on the GPU" if self.gpu else ""
        how += "; they augment too (CPU)" if self.decoder.recipe is not None else ""
        log.info("streaming with %d decoding processes%s", self.workers, how)

    def __len__(self) -> int:
        return len(self.catalog)

    def _loader(self) -> torch.utils.data.DataLoader:
        if self.loader is None:
            self.loader = stream.loader(self.decoder, self.sampler, self.workers, self.device.type == "cuda")
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
                    f"{stream.TRIES} images in a row from {printable(out['failed'])} on in {self.source} cannot be "
                    "read: check the data (the log names the unreadable images)"
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


def streams(spec: DataSpec, listed: Catalog, size: int, how: str) -> bool:
    """Whether to stream `listed` at `size` px (not asked under --no-stream): under --stream, else when the decoded
    set would take more than FIT of the available memory; logs which and why (`how`: what streaming does here)."""
    spec = config_of(DataSpec, spec)
    need, free = len(listed) * 3 * size * size, available_memory()
    shown = f"{len(listed):,} images at {size} px take {need / 1e9:.1f} GB decoded"
    if spec.stream is None and need <= FIT * free:
        log.info("data: in memory (%s, within half of the %.1f GB available; --stream decodes on the fly instead)",
                 shown, free / 1e9)  # fmt: skip
        return False
    why = "--stream" if spec.stream else f"more than half of the {free / 1e9:.1f} GB available"
    log.info("data: streaming from %s (%s, %s); %s", listed.source, shown, why, how)
    return True


def open_feed(
    spec: DataSpec, device: torch.device, plan: list[tuple[int, float, float]], seed: int,
    recipe: Callable[[Crops, torch.Generator], list[torch.Tensor]] | None = None,
) -> Feed:  # fmt: skip
    """The training data: in memory when --no-stream or when the decoded set fits (FIT of the available memory),
    streamed otherwise; logs which and why. `plan` is the method's views (side, min area, max area) for streaming;
    `recipe` its augmentation, which streaming workers run on a CPU (StreamFeed)."""
    spec = config_of(DataSpec, spec)
    if REGISTRY[spec.data].list is None or spec.stream is False:
        if REGISTRY[spec.data].list is not None:
            log.info("data: in memory (--no-stream): decoded once into a memory-mapped cache")
        return MemoryFeed(load(spec), device)
    listed = catalog(spec)
    size = plan[0][0]
    if not streams(spec, listed, size, "random-resized crops are cut from the full-resolution images"):
        return MemoryFeed(load_catalog(listed, size, spec.cache_dir), device)
    return StreamFeed(listed, size, plan, seed, device, spec.workers, spec.gpu_decode, recipe)
