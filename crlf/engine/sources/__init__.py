"""Data sources behind one interface and a registry: a new source is one module here.

Every source reads a split into an ``ImageSet`` (uint8 N x 3 x S x S in memory, or memory-mapped from a cache);
the sources that can stream (folder, tar shards) also list it as a ``Catalog`` whose images are decoded on the fly
(sources.stream). ``load`` and ``catalog`` apply --limit and --image-size the same way for every source, and
sources.feed decides, by size, which of the two a training run uses. What to read is a ``DataSpec``; the entry points
also take the command layer's settings, whose same-named fields they copy (crlf.typed.config_of).
"""

from __future__ import annotations

# ruff: noqa: I001 - the sources register on import, in the order --data lists them
from crlf.engine.sources import builtin, folder, arrays, tar  # noqa: F401
from crlf.engine.sources.base import REGISTRY, Catalog, DataSpec, ImageSet, Request, Source, pick, resize
from crlf.errors import InputError
from crlf.typed import config_of

__all__ = ["REGISTRY", "Catalog", "DataSpec", "ImageSet", "Request", "Source", "catalog", "load", "pick",
           "request", "resize", "split_of"]  # fmt: skip


def split_of(spec: DataSpec, split: str | None = None) -> str:
    """The split read for `split`: else spec.split, else the source's own (stl10: train+unlabeled, else train)."""
    spec = config_of(DataSpec, spec)
    return split or spec.split or REGISTRY[spec.data].split


def request(spec: DataSpec, split: str | None = None) -> Request:
    """What `spec` asks of its source for `split` (default: spec.split, else the source's training split)."""
    spec = config_of(DataSpec, spec)
    split = split_of(spec, split)
    path = spec.data_dir.expanduser() if spec.data_dir is not None else None
    own_test = split == "test" and spec.test_data_dir is not None  # a file / folder that is the test split
    if own_test:
        path = spec.test_data_dir.expanduser()  # type: ignore[union-attr]
    size = spec.image_size or REGISTRY[spec.data].default_size
    return Request(spec, split, path, own_test, size)


def load(spec: DataSpec, split: str | None = None) -> ImageSet:
    """Read the source named by `spec` into memory (`split` overrides spec.split), then apply limit and
    image_size."""
    spec = config_of(DataSpec, spec)
    req = request(spec, split)
    images = REGISTRY[spec.data].read(req)
    keep = pick(len(images), spec.limit)
    if keep is not None:
        images = images.subset(keep)
    if req.size is not None and tuple(images.images.shape[-2:]) != (req.size, req.size):
        images.images = resize(images.images, req.size)
    return images


def catalog(spec: DataSpec, split: str | None = None) -> Catalog:
    """List the split of a streaming source without decoding it (the same --limit subset as load)."""
    spec = config_of(DataSpec, spec)
    lister = REGISTRY[spec.data].list
    if lister is None:
        streamable = ", ".join(sorted(k for k, v in REGISTRY.items() if v.list is not None))
        raise InputError(f"--data {spec.data} is read into memory; --stream is for {streamable}: drop --stream")
    listed = lister(request(spec, split))
    keep = pick(len(listed), spec.limit)
    return listed if keep is None else listed.subset(keep.tolist())
