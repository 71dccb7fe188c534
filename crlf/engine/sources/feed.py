"""What the training loop reads: a Feed of uint8 batches (in memory) or of pre-cut views (streaming), and the rule
that picks one by size.

The loop owns the order: each epoch it draws one permutation from (seed, epoch) and asks the feed for the rows of
steps first..steps-1 that are this process's share. A feed never draws from the loop's generators, so the order, the
crops and a resumed run's next batch depend on (seed, epoch, step) alone.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from crlf.engine.augment import Crops, Views
from crlf.engine.sources import catalog, load
from crlf.engine.sources.base import Catalog, ImageSet
from crlf.engine.sources.cache import load_catalog
from crlf.options import DataSettings

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


def streams(settings: DataSettings, listed: Catalog, size: int, how: str) -> bool:
    """Whether to stream `listed` at `size` px (not asked under --no-stream): under --stream, else when the decoded
    set would take more than FIT of the available memory; logs which and why (`how`: what streaming does here)."""
    need, free = len(listed) * 3 * size * size, available_memory()
    shown = f"{len(listed):,} images at {size} px take {need / 1e9:.1f} GB decoded"
    if settings.stream is None and need <= FIT * free:
        log.info("data: in memory (%s, within half of the %.1f GB available; --stream decodes on the fly instead)",
                 shown, free / 1e9)  # fmt: skip
        return False
    why = "--stream" if settings.stream else f"more than half of the {free / 1e9:.1f} GB available"
    log.info("data: streaming from %s (%s, %s); %s", listed.source, shown, why, how)
    return True


def open_feed(
    settings: DataSettings, device: torch.device, plan: list[tuple[int, float, float]], seed: int,
    recipe: Callable[[Crops, torch.Generator], list[torch.Tensor]] | None = None,
) -> Feed:  # fmt: skip
    """The training data: in memory when --no-stream or when the decoded set fits (FIT of the available memory),
    streamed otherwise; logs which and why. `plan` is the method's views (side, min area, max area) for streaming;
    `recipe` its augmentation, which streaming workers run on a CPU (StreamFeed)."""
    from crlf.engine.sources import REGISTRY

    if REGISTRY[settings.data].list is None or settings.stream is False:
        if REGISTRY[settings.data].list is not None:
            log.info("data: in memory (--no-stream): decoded once into a memory-mapped cache")
        return MemoryFeed(load(settings), device)
    listed = catalog(settings)
    size = plan[0][0]
    if not streams(settings, listed, size, "random-resized crops are cut from the full-resolution images"):
        return MemoryFeed(load_catalog(listed, size, settings.cache_dir), device)
    from crlf.engine.sources.stream import StreamFeed

    return StreamFeed(listed, size, plan, seed, device, settings.workers, settings.gpu_decode, recipe)
