"""The 'tar' source: WebDataset-style shards, listed by reading their member headers (never extracted).

A sample is the members of one shard that share a key (the path up to the first dot of the file name): one image
(.jpg, .jpeg, .png or .webp; the first in that order when there are several) and optionally a .cls member holding
an integer label. Class names, when wanted, are a classes.txt beside the shards (line k names class k).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import tarfile
from pathlib import Path

import numpy as np

from crlf.engine.sources.arrays import label_bound_problem
from crlf.engine.sources.base import Catalog, ImageSet, Request, register
from crlf.engine.sources.cache import load_catalog
from crlf.engine.sources.images import printable
from crlf.errors import InputError, short_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: 'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); '{x,y}'."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return list(
        itertools.chain.from_iterable(expand_braces(pattern[: m.start()] + i + pattern[m.end() :]) for i in items)
    )


def shard_paths(data_dir: Path, split: str) -> list[Path]:
    """The shards a --data-dir names: a .tar file, a folder of them (its split/ sub-folder for another split than
    train), or a brace / glob pattern. Sorted within a folder or glob, in pattern order for braces."""
    text = os.path.expanduser(str(data_dir))
    if "{" in text or any(c in text for c in "*?["):
        found = [
            Path(p)
            for part in expand_braces(text)
            for p in (sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
        ]
        missing = [p for p in found if not p.is_file()]
        if not found or missing:
            why = f": {printable(str(missing[0]))} is missing" if missing else ""
            raise InputError(f"{printable(text)} names no shard{why}: point --data-dir at .tar files that exist")
        return found
    path = Path(text)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(
            f"'{printable(text)}' does not exist: point --data-dir at a .tar shard, a folder of them or a "
            "pattern like 'shards-{000..009}.tar'"
        )
    folder = path / split if (path / split).is_dir() else path
    if folder == path and split != "train":
        raise InputError(
            f"'{printable(text)}' has no {split}/ sub-folder of shards: give the {split} shards with --test-data-dir"
            if split == "test"
            else f"'{printable(text)}' has no {split}/ sub-folder"
        )
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".tar" and p.is_file() and not p.name.startswith("."))
    if not shards:
        raise InputError(f"no .tar shards in {printable(str(folder))}: put WebDataset-style .tar files in it")
    return shards


def list_tar(req: Request) -> Catalog:
    """Every sample of the shards, listed from their member headers; samples without an image are skipped."""
    assert req.path is not None  # the settings (DataSettings) require a path for tar data
    shards = shard_paths(req.path, "train" if req.own_test else req.split)
    file, offset, size, suffix, ids, labels = [], [], [], [], [], []
    skipped: list[str] = []
    for k, shard in enumerate(shards):
        samples, odd = _samples(shard)
        skipped += [f"{printable(f'{shard.stem}/{member}')} ({why})" for member, why in odd]
        for key, members in samples.items():
            name = f"{shard.stem}/{key}"
            ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if ext is None:
                skipped.append(f"{printable(name)} (no {', '.join(IMAGE_EXTENSIONS)} member)")
                continue
            file.append(k)
            offset.append(members[ext][0])
            size.append(members[ext][1])
            suffix.append("." + ext)
            ids.append(printable(name))
            labels.append(_label(shard, members.get("cls")))
    shown = printable(os.path.expanduser(str(req.path)))
    if not ids:
        raise InputError(
            f"no images in the shards {shown} ({', '.join(skipped[:3]) or 'empty'}): a sample is an "
            f"image member ({', '.join(IMAGE_EXTENSIONS)}) and an optional .cls label sharing a key"
        )
    known = [y for y in labels if y is not None]
    names: list[str] = []
    label_array = None
    if known and len(known) < len(labels):
        log.warning(
            "%s of %s samples in %s have no (readable) .cls label: training without labels",
            f"{len(labels) - len(known):,}",
            f"{len(labels):,}",
            shown,
        )
    elif known:
        label_array = np.array(known, np.int64)
        names_file = shards[0].parent / "classes.txt"
        listed = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else None
        problem = label_bound_problem(int(label_array.max()), len(label_array), listed)
        if problem:
            raise InputError(f"{shown}: {problem}")
        names = listed or [str(i) for i in range(int(label_array.max()) + 1)]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    return Catalog(
        files=[str(p) for p in shards],
        file=np.array(file, np.int64),
        offset=np.array(offset, np.int64),
        size=np.array(size, np.int64),
        suffix=suffix,
        ids=ids,
        labels=label_array,
        class_names=names,
        source=f"tar:{shown}",
        identity=json.dumps(["tar", [s[0] for s in stats]]),
        fingerprint=hashlib.sha256(json.dumps(stats).encode()).hexdigest(),
        skipped=skipped,
        listed=len(ids) + len(skipped),
    )


def _samples(shard: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], list[tuple[str, str]]]:
    """key -> {extension: (data offset, size)} of the regular members of an uncompressed tar; and (name, why) of the
    members that cannot be part of a sample: links (never followed), devices, FIFOs, sparse files, names without an
    extension. Directories are the shard's own structure (tar cf lists each folder), not left-out data: not named."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    odd: list[tuple[str, str]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for m in tar:
                base = posixpath.basename(m.name)
                if m.isdir() or base.startswith("."):
                    continue
                why = _not_a_file(m) or (None if "." in base else "no extension")
                if why:
                    odd.append((m.name, why))
                    continue
                stem, ext = base.split(".", 1)
                key = posixpath.join(posixpath.dirname(m.name), stem)
                out.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(
            f"cannot read the shard {printable(str(shard))} ({short_reason(e)}): shards are "
            "uncompressed .tar files (tar cf, or webdataset's ShardWriter)"
        ) from None
    return out, odd


def _not_a_file(m: tarfile.TarInfo) -> str | None:
    """Why a member holds no bytes of its own at its data offset (None: a regular file)."""
    if m.issym():
        return "a symbolic link"
    if m.islnk():
        return "a hard link"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a FIFO"
    if m.issparse():
        return "a sparse file"
    return None if m.isfile() else "not a regular file"


def _label(shard: Path, member: tuple[int, int] | None) -> int | None:
    """The integer in a .cls member, or None (absent or not an integer >= 0)."""
    if member is None or member[1] > 64:
        return None
    with open(shard, "rb") as f:
        text = os.pread(f.fileno(), member[1], member[0]).strip()
    return int(text) if text.isdigit() else None


@register("tar", 64, list=list_tar, path="shards", about="WebDataset-style .tar shards")
def read_tar(req: Request) -> ImageSet:
    """--data tar in memory: decoded once at the image size, then read from the memory-mapped cache."""
    assert req.size is not None
    return load_catalog(list_tar(req), req.size, req.spec.cache_dir)
