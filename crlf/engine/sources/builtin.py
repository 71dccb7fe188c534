"""The built-in data sets, read whole into memory: scikit-learn's digits, CIFAR-10 / CIFAR-100 and STL-10."""

from __future__ import annotations

import codecs
import contextlib
import logging
import pickle
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from crlf.engine.sources.base import ImageSet, Request, pick, register, split_ids
from crlf.errors import InputError, short_reason

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

log = logging.getLogger(__name__)


@register("digits", 16, about="offline")
def read_digits(req: Request) -> ImageSet:
    """--data digits."""
    return _digits(req.split)


@register("cifar10", 32)
def read_cifar10(req: Request) -> ImageSet:
    """--data cifar10."""
    return _cifar("cifar10", req.path, req.split, req.spec.download)


@register("cifar100", 32)
def read_cifar100(req: Request) -> ImageSet:
    """--data cifar100."""
    return _cifar("cifar100", req.path, req.split, req.spec.download)


@register("stl10", 96, split="train+unlabeled")  # by default the 5,000 labelled and 100,000 unlabelled images
def read_stl10(req: Request) -> ImageSet:
    """--data stl10 (a --limit is applied while reading: only the picked rows are read from disk)."""
    return _stl10(req.path, req.split, req.spec.download, req.spec.limit)


def _digits(split: str) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits (offline): 0..16 scaled to 0..255, replicated to 3 channels.

    Every fifth image (359) is the test split, the other 1,438 the train split: fixed, so evaluations can hold out.
    """
    if split not in ("train", "test"):
        raise InputError(f"digits has the splits train (1,438 images) and test (359), not '{split}'")
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = np.arange(len(d.images))
    rows = rows[rows % 5 == 4] if split == "test" else rows[rows % 5 != 4]
    grey = torch.from_numpy(np.round(d.images[rows] * (255 / 16)).astype(np.uint8))
    images = grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(
        images,
        torch.from_numpy(d.target[rows].astype(np.int64)),
        [str(i) for i in range(10)],
        [f"{split}/{i}" for i in rows.tolist()],
        f"digits:{split}",
    )


# --- CIFAR and STL-10: tarballs, found, extracted or downloaded ---------------------------------
class _Archive(NamedTuple):
    name: str  # for messages
    folder: str  # what the tarball extracts to
    marker: str  # a file that proves the extracted folder is there
    url: str
    md5: str

    @property
    def tarball(self) -> str:
        return self.url.rsplit("/", 1)[1]


_ARCHIVES = {  # URLs and checksums as torchvision's CIFAR10 / CIFAR100 / STL10 classes define them
    "cifar10": _Archive(
        "CIFAR-10",
        "cifar-10-batches-py",
        "batches.meta",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _Archive(
        "CIFAR-100",
        "cifar-100-python",
        "meta",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "stl10": _Archive(
        "STL-10",
        "stl10_binary",
        "class_names.txt",
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
    ),
}
_CIFAR_FILES = {  # split -> batch files, then the label key and the class-name key
    "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "labels", "label_names"),
    "cifar100": ({"train": ["train"], "test": ["test"]}, "fine_labels", "fine_label_names"),
}


def _locate(spec: _Archive, data_dir: Path | None, download: bool) -> Path:
    """The extracted folder: under the root (or the root itself), else extracted from the tarball, else downloaded."""
    root, shown = (data_dir, str(data_dir)) if data_dir is not None else (Path("data"), "./data")
    for folder in (root / spec.folder, root):
        if (folder / spec.marker).is_file():
            log.info("reading %s from %s", spec.name, folder)
            return folder
    tarball = root / spec.tarball
    if not tarball.is_file():
        reason = "downloads are off (--no-download)"
        if download:
            try:
                from torchvision.datasets.utils import download_url  # checksummed; the extraction below is ours

                made = [p for p in (root, *root.parents) if not p.exists()]  # the innermost first
                root.mkdir(parents=True, exist_ok=True)
                log.info("downloading %s from %s", spec.name, spec.url)
                download_url(spec.url, str(root), spec.tarball, spec.md5)
            except Exception as e:  # any failure (network, disk, checksum) becomes one message
                tarball.unlink(missing_ok=True)
                for folder in made:  # the folders made for it, when empty: a failed start leaves nothing
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                reason = f"the download failed ({short_reason(e)})"
        if not tarball.is_file():
            raise InputError(
                f"{spec.name} not found in '{shown}' and {reason}: put {spec.tarball} or its extracted "
                f"{spec.folder}/ folder in '{shown}' (or point --data-dir at it)"
            )
    log.info("extracting %s", tarball)
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="data")  # refuses absolute paths, '..', devices and links out of root
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"cannot extract {tarball} ({short_reason(e)}): delete it and download it again") from None
    if not (root / spec.folder / spec.marker).is_file():
        raise InputError(
            f"{tarball} has no {spec.folder}/{spec.marker}: it is not the {spec.name} archive; "
            "delete it and download it again"
        )
    return root / spec.folder


class _Refused(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: only numpy array reconstruction may be called; any other global is refused."""

    allowed: dict[tuple[str, str], Any] = {
        **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise _Refused(f"{module}.{name}")
        return self.allowed[(module, name)]


def _read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict, read without ever running code from the file."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise InputError(
            f"refusing to unpickle {e} from {path}: a CIFAR batch holds only numpy arrays; "
            "replace the file with the original download"
        ) from None
    except Exception as e:  # missing, truncated or not a pickle: pickle raises many types
        raise InputError(
            f"cannot read {path} ({short_reason(e)}): replace it with the file from the original download"
        ) from None
    if not isinstance(obj, dict):
        raise InputError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict: replace it with the original download"
        )
    return obj


def _cifar(data: str, data_dir: Path | None, split: str, download: bool) -> ImageSet:
    """CIFAR-10 / CIFAR-100 from the python batches (train: 50,000, test: 10,000 images of 32x32)."""
    spec, (files, label_key, names_key) = _ARCHIVES[data], _CIFAR_FILES[data]
    if split not in files:
        raise InputError(f"{spec.name} has the splits train and test, not '{split}'")
    folder = _locate(spec, data_dir, download)
    names = _read_batch(folder / spec.marker).get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{folder / spec.marker} has no '{names_key}' list: replace it with the original download")
    xs, ys = [], []
    for name in files[split]:
        batch = _read_batch(folder / name)
        x, y = batch.get("data"), batch.get(label_key)
        if not (
            isinstance(x, np.ndarray)
            and x.dtype == np.uint8
            and x.shape[1:] == (3072,)
            and isinstance(y, (list, np.ndarray))
            and len(y) == len(x)
        ):
            raise InputError(
                f"{folder / name} is not a {spec.name} batch (uint8 'data' (N, 3072) and N '{label_key}'): "
                "replace it with the original download"
            )
        try:
            y = np.asarray(y)
        except ValueError:  # a ragged list
            y = np.asarray([None])
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise InputError(
                f"{folder / name}: its {label_key!r} are not {len(x):,} integers: replace it with the original download"
            )
        xs.append(x)
        ys.append(y)
    labels = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    if not len(labels) or labels.min() < 0 or labels.max() >= len(names):
        raise InputError(
            f"{folder} has no images or labels outside 0..{len(names) - 1}: replace it with the original download"
        )
    images = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))
    return ImageSet(images, labels, names, split_ids(split, len(images)), f"{data}:{split}")


def _stl10(data_dir: Path | None, split: str, download: bool, limit: int | None) -> ImageSet:
    """STL-10's raw binaries (3x96x96, column-major); with a limit only the picked rows are read from disk."""
    parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
    folder = _locate(_ARCHIVES["stl10"], data_dir, download)
    names = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
    counts = []
    for part in parts:
        path, pixels = folder / f"{part}_X.bin", 3 * 96 * 96
        if not path.is_file() or path.stat().st_size % pixels:
            raise InputError(f"{path} is missing or truncated: extract the complete stl10_binary.tar.gz")
        counts.append(path.stat().st_size // pixels)
    rows = pick(sum(counts), limit)
    rows = torch.arange(sum(counts)) if rows is None else rows
    images = np.empty((len(rows), 3, 96, 96), np.uint8)
    labels: list[np.ndarray] | None = None if "unlabeled" in parts else []
    ids, done, offset = [], 0, 0
    for part, n in zip(parts, counts):
        mine = (rows[(rows >= offset) & (rows < offset + n)] - offset).numpy()
        offset += n
        raw = (
            np.memmap(folder / f"{part}_X.bin", np.uint8, "r", shape=(n, 3, 96, 96))
            if n
            else np.empty((0, 3, 96, 96), np.uint8)
        )
        for i in range(0, len(mine), 4096):  # in chunks: the 100,000 unlabeled images are 2.8 GB
            chunk = mine[i : i + 4096]
            images[done : done + len(chunk)] = raw[chunk].transpose(0, 1, 3, 2)  # stored (C, W, H) -> (C, H, W)
            done += len(chunk)
        ids += [f"{part}/{r}" for r in mine.tolist()]
        if labels is not None:
            label_file = folder / f"{part}_y.bin"
            y = (
                np.fromfile(label_file, np.uint8).astype(np.int64) - 1
                if label_file.is_file()
                else np.empty(0, np.int64)
            )
            if len(y) != n or (n and (y.min() < 0 or y.max() >= len(names))):
                raise InputError(
                    f"{label_file} does not hold {n:,} labels in 1..{len(names)}: "
                    "extract the complete stl10_binary.tar.gz"
                )
            labels.append(y[mine])
    label_tensor = None if labels is None else torch.from_numpy(np.concatenate(labels))
    return ImageSet(torch.from_numpy(images), label_tensor, [] if labels is None else names, ids, f"stl10:{split}")

