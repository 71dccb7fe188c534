"""Data sources behind one interface and a registry: a new source is one module here.

Every source reads a split into an ``ImageSet`` (uint8 N x 3 x S x S in memory, or memory-mapped from a cache);
the sources that can stream (folder, tar shards) also list it as a ``Catalog`` whose images are decoded on the fly
(sources.stream). ``load`` and ``catalog`` apply --limit and --image-size the same way for every source, and
sources.feed decides, by size, which of the two a training run uses.
"""

from __future__ import annotations

from crlf.engine.sources.base import REGISTRY, Catalog, ImageSet, Request, Source, pick, resize
from crlf.errors import InputError, short_reason
from crlf.options import DataSettings

__all__ = ["REGISTRY", "Catalog", "ImageSet", "Request", "Source", "catalog", "load", "pick", "request",
           "short_reason"]  # fmt: skip


def request(settings: DataSettings, split: str | None = None) -> Request:
    """What `settings` ask of their source for `split` (default: settings.split, else the source's training split)."""
    split = split or settings.split or ("train+unlabeled" if settings.data == "stl10" else "train")
    path = settings.data_dir.expanduser() if settings.data_dir is not None else None
    own_test = split == "test" and settings.test_data_dir is not None  # a file / folder that is the test split
    if own_test:
        path = settings.test_data_dir.expanduser()  # type: ignore[union-attr]
    size = settings.image_size or REGISTRY[settings.data].default_size
    return Request(settings, split, path, own_test, size)


def load(settings: DataSettings, split: str | None = None) -> ImageSet:
    """Read the source named by ``settings`` into memory (``split`` overrides settings.split), then apply limit and
    image_size."""
    req = request(settings, split)
    images = REGISTRY[settings.data].read(req)
    keep = pick(len(images), settings.limit)
    if keep is not None:
        images = images.subset(keep)
    if req.size is not None and tuple(images.images.shape[-2:]) != (req.size, req.size):
        images.images = resize(images.images, req.size)
    return images


def catalog(settings: DataSettings, split: str | None = None) -> Catalog:
    """List the split of a streaming source without decoding it (the same --limit subset as load)."""
    lister = REGISTRY[settings.data].list
    if lister is None:
        streamable = ", ".join(sorted(k for k, v in REGISTRY.items() if v.list is not None))
        raise InputError(f"--data {settings.data} is read into memory; --stream is for {streamable}: drop --stream")
    listed = lister(request(settings, split))
    keep = pick(len(listed), settings.limit)
    return listed if keep is None else listed.subset(keep.tolist())


# the sources register themselves on import
from crlf.engine.sources import arrays, builtin, folder, tar  # noqa: E402,F401
