"""Every data source -> one in-memory ``ImageSet`` (uint8 N x 3 x H x W); bad input becomes a one-line InputError."""

from __future__ import annotations

import codecs
import logging
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from crlf.errors import InputError
from crlf.settings import DataSettings

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

log = logging.getLogger(__name__)

_DEFAULT_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "stl10": 96, "folder": 64}


@dataclass
class ImageSet:
    """A whole data set in memory: uint8 images (N, 3, H, W), optional int64 labels and one id per row."""

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


def load(settings: DataSettings, split: str | None = None) -> ImageSet:
    """Read the source named by ``settings`` (``split`` overrides settings.split), then apply limit and image_size."""
    split = split or settings.split or ("train+unlabeled" if settings.data == "stl10" else "train")
    path = settings.data_dir.expanduser() if settings.data_dir is not None else None
    own_test = split == "test" and settings.test_data_dir is not None  # a file / folder that is the test split
    if own_test:
        path = settings.test_data_dir.expanduser()  # type: ignore[union-attr]
    size = settings.image_size or _DEFAULT_SIZE.get(settings.data)
    if settings.data == "digits":
        images = _digits(split)
    elif settings.data in ("cifar10", "cifar100"):
        images = _cifar(settings.data, path, split, settings.download)
    elif settings.data == "stl10":
        images = _stl10(path, split, settings.download, settings.limit)
    elif settings.data == "folder":
        assert path is not None and size is not None  # DataSettings requires a path for folder / npy / npz
        from crlf.engine.folder import load_folder  # here, not at the top: folder.py builds on this module

        images = load_folder(path, "train" if own_test else split, size, settings.cache_dir)
    else:
        assert path is not None
        images = _array_file(path, settings.data, split, own_test)
    keep = pick(len(images), settings.limit)
    if keep is not None:
        images = images.subset(keep)
    if size is not None and tuple(images.images.shape[-2:]) != (size, size):
        images.images = resize(images.images, size)
    return images


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
    out = torch.empty((n, 3, size, size), dtype=images.dtype if not uint8 else torch.uint8, device=images.device)
    chunk = max(1, 2**24 // (3 * max(side, size) ** 2))
    for i in range(0, n, chunk):
        x = F.interpolate(
            src[i : i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8) if uint8 else x
    return out


def short_reason(e: BaseException) -> str:
    """A one-line reason for an exception, at most 120 characters (a URLError: its reason)."""
    text = (str(e.reason) if isinstance(e, URLError) else str(e)).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _ids(split: str, n: int) -> list[str]:
    return [f"{split}/{i}" for i in range(n)]


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

                root.mkdir(parents=True, exist_ok=True)
                log.info("downloading %s from %s", spec.name, spec.url)
                download_url(spec.url, str(root), spec.tarball, spec.md5)
            except Exception as e:  # any failure (network, disk, checksum) becomes one message
                tarball.unlink(missing_ok=True)
                reason = f"the download failed ({short_reason(e)})"
        if not tarball.is_file():
            raise InputError(
                f"{spec.name} not found in {shown} and {reason}: put {spec.tarball} or its extracted "
                f"{spec.folder}/ folder in {shown} (or point --data-dir at it)"
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
    return ImageSet(images, labels, names, _ids(split, len(images)), f"{data}:{split}")


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


# --- npy / npz -----------------------------------------------------------------------------------
def _array_file(path: Path, kind: str, split: str, own_test: bool = False) -> ImageSet:
    """A uint8 image array: .npy (labels in <stem>.labels.npy) or .npz (images / x, labels / y, class_names).
    The file is the train split, or the test split when it came from --test-data-dir (`own_test`)."""
    if split != "train" and not own_test:
        raise InputError(
            f"a .{kind} file has no '{split}' split: give the {split} images with --test-data-dir FILE "
            f"(or extract both files with crlf extract and evaluate with --train-emb / --test-emb)"
        )
    loaded, names = _np_load(path), None
    if isinstance(loaded, np.ndarray) != (kind == "npy"):
        raise InputError(f"{path} is not an .{kind} file: use --data {'npz' if kind == 'npy' else 'npy'}")
    if kind == "npy":
        label_file = path.with_name(path.name.removesuffix(".npy") + ".labels.npy")
        x, y = loaded, _np_load(label_file) if label_file.is_file() else None
    else:
        with loaded:
            key = next((k for k in ("images", "x") if k in loaded.files), None)
            if key is None:
                raise InputError(
                    f"{path} has no 'images' (or 'x') array; it holds: {', '.join(loaded.files) or 'nothing'}"
                )
            try:
                x = loaded[key]
                y = next((loaded[k] for k in ("labels", "y") if k in loaded.files), None)
                names = [str(n) for n in loaded["class_names"].tolist()] if "class_names" in loaded.files else None
            except ValueError as e:  # object arrays would need pickle, which stays off
                raise InputError(
                    f"cannot read {path} ({short_reason(e)}): store plain numeric and string arrays"
                ) from None
    images = _check_images(x, path)
    labels = None if y is None else _check_labels(y, len(images), path, names)
    if labels is not None and names is None:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(images, labels, names or [], _ids(split, len(images)), f"{kind}:{path.resolve()}")


def _np_load(path: Path) -> Any:
    """np.load with pickle off; a missing or unreadable file becomes an InputError."""
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file: point --data-dir at the .npy / .npz file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / EOFError / BadZipFile for bad files
        raise InputError(
            f"cannot read {path} ({short_reason(e)}): save it with numpy.save / numpy.savez (no object arrays)"
        ) from None


def _check_images(x: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 (N, H, W, C) with C 1 or 3, or (N, H, W) -> (N, 3, H, W) tensor."""
    if x.dtype != np.uint8:
        raise InputError(
            f"{path}: images must be uint8 (0-255), found {x.dtype}: convert them, "
            "e.g. (x * 255).round().astype('uint8') for floats in [0, 1]"
        )
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        hint = "; it looks channels-first: save x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise InputError(
            f"{path}: expected images of shape (N, H, W, C) with C 1 or 3, or (N, H, W), N > 0; found {x.shape}{hint}"
        )
    if 0 in x.shape[1:3]:
        raise InputError(
            f"{path}: images of {x.shape[1]}x{x.shape[2]} px (array shape {x.shape}) have no pixels: save images "
            "of shape (N, H, W, C) with H and W > 0"
        )
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


FREE_CLASSES = 1000  # without class names, labels below max(images, this) are taken for class indices


def _check_labels(y: np.ndarray, n: int, path: Path, names: list[str] | None = None) -> torch.Tensor:
    """Integer labels, one per image, that are class indices -> int64 tensor; InputError naming the problem."""
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise InputError(f"{path}: expected {n:,} integer labels (one per image), found {y.dtype} of shape {y.shape}")
    if n and y.min() < 0:
        raise InputError(f"{path}: labels must be >= 0, found {y.min()}")
    problem = label_bound_problem(int(y.max()) if n else -1, n, names)
    if problem:
        raise InputError(f"{path}: {problem}")
    return torch.from_numpy(y.astype(np.int64))


def label_bound_problem(top: int, n: int, names: list[str] | None) -> str | None:
    """Why the largest label `top` of `n` rows cannot be a class index, or None. With class names a label must index
    them; without, it must stay below the number of rows or FREE_CLASSES, whichever is larger (a label of 2e7 would
    make 2e7 classes, and as many names, logits and confusion-matrix rows)."""
    if names is not None and top >= len(names):
        return f"{len(names)} class_names but labels up to {top}: give one name per class (labels index class_names)"
    bound = max(n, FREE_CLASSES)
    if names is None and top >= bound:
        return (
            f"labels go up to {top:,} for {n:,} rows: labels are class indices 0..C-1 with C below the number of rows "
            f"or {FREE_CLASSES:,}; renumber them (numpy.unique(labels, return_inverse=True)[1]) or give class_names"
        )
    return None
