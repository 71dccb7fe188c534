"""uint8 image arrays in .npy / .npz files, read whole into memory (nothing is unpickled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlf.engine.sources.base import ImageSet, Request, register, split_ids
from crlf.errors import InputError, short_reason


@register("npy", path="file")
def read_npy(req: Request) -> ImageSet:
    """--data npy: a uint8 array, labels in a sibling <name>.labels.npy."""
    assert req.path is not None  # the settings (DataSettings) require a path for npy / npz
    return _array_file(req.path, "npy", req.split, req.own_test)


@register("npz", path="file", about="uint8 NHWC arrays")
def read_npz(req: Request) -> ImageSet:
    """--data npz: arrays images / x, labels / y and class_names."""
    assert req.path is not None
    return _array_file(req.path, "npz", req.split, req.own_test)


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
    return ImageSet(images, labels, names or [], split_ids(split, len(images)), f"{kind}:{path.resolve()}")


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
