"""The embedding files of ``crlf extract``: write them with their provenance, read them back checked.

Files: ``emb.npy`` (float32 N x D) with ``emb.npy.json`` beside it (provenance, ids, labels), or one ``emb.npz``
holding ``embeddings``, ``labels`` (when known), ``ids``, ``class_names`` and ``provenance`` (a JSON string).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlf.engine.files import atomic_write, os_failure
from crlf.engine.sources.arrays import label_bound_problem
from crlf.errors import InputError, quoted

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embeddings of a data set in its row order, with what is known about the rows and where they came from."""

    x: torch.Tensor  # float32 (N, D) on the CPU
    labels: torch.Tensor | None  # int64 (N,), or None for unlabelled data
    ids: list[str]  # image ids / file paths, row by row
    class_names: list[str]
    provenance: dict[str, Any]


def write_embeddings(out: Path, emb: Embeddings) -> None:
    """.npz: everything in one file; .npy: the array, then its JSON sidecar (each written atomically)."""
    arr = emb.x.numpy()
    labels, provenance = None if emb.labels is None else emb.labels.numpy(), emb.provenance
    try:
        if out.suffix == ".npz":
            arrays: dict[str, np.ndarray] = {
                "embeddings": arr,
                "ids": np.array(emb.ids, dtype=np.str_),
                "class_names": np.array(emb.class_names, dtype=np.str_),
                "provenance": np.array(json.dumps(provenance)),
            }
            if labels is not None:
                arrays["labels"] = labels
            atomic_write(out, lambda f: np.savez(f, **arrays))
        else:
            sidecar = {
                **provenance,
                "ids": emb.ids,
                "class_names": emb.class_names,
                "labels": None if labels is None else labels.tolist(),
            }
            buffer = io.BytesIO()
            np.save(buffer, arr)
            npy = buffer.getvalue()
            # the sidecar names the exact .npy it describes: a kill between the two renames leaves a pair that
            # readers refuse, never new rows with old labels
            sidecar.update(npy_sha256=hashlib.sha256(npy).hexdigest(), npy_bytes=len(npy))
            atomic_write(out, lambda f: f.write(npy))
            atomic_write(Path(str(out) + ".json"), lambda f: f.write(json.dumps(sidecar).encode()))
    except OSError as e:
        raise os_failure(e, str(out), "choose a writable --out") from None
    log.info("wrote %s x %d embeddings to %s", f"{len(arr):,}", arr.shape[1], out)


def read_embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str], dict[str, Any]]:
    """Embeddings written by extract -> (float32 N x D, labels or None, class names, provenance)."""
    path = path.expanduser()
    if not path.is_file():
        raise InputError(f"{quoted(path)} does not exist: write it with crlf extract --out {path.name}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                x = z["embeddings"]
                labels = z["labels"] if "labels" in z.files else None
                names, prov = z["class_names"].tolist(), json.loads(str(z["provenance"]))
        else:
            raw = path.read_bytes()  # read once: the rows and the bytes the sidecar's hash is checked on
            x = np.load(io.BytesIO(raw), allow_pickle=False)
            side = Path(str(path) + ".json")
            meta = json.loads(side.read_text()) if side.is_file() else {}
            _check_pair(raw, path, side, meta)
            labels = None if meta.get("labels") is None else np.asarray(meta["labels"])
            names, prov = meta.get("class_names", []), meta
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"{quoted(path)} is not an embeddings file written by crlf extract ({str(e).splitlines()[0]})"
        ) from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or 0 in x.shape:
        raise InputError(f"{quoted(path)}: expected a float N x D array with N, D > 0, found {x.dtype} {x.shape}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(prov, dict):
        raise InputError(f"{quoted(path)}: its class names or provenance are damaged; re-create it with crlf extract")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(x),):
            raise InputError(
                f"{quoted(path)}: expected {len(x):,} integer labels (one per embedding), found {labels.dtype} of "
                f"shape {labels.shape}; re-create it with crlf extract"
            )
        problem = "labels must be >= 0" if labels.min() < 0 else None
        problem = problem or label_bound_problem(int(labels.max()), len(x), names or None)
        if problem:
            raise InputError(f"{quoted(path)}: {problem}")
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        y,
        list(names),
        {k: v for k, v in prov.items() if k not in ("ids", "labels")},
    )


def _check_pair(raw: bytes, npy: Path, side: Path, meta: dict[str, Any]) -> None:
    """The sidecar must describe this very .npy (`raw`: its bytes; size, then hash): else the rows and the labels
    come from two runs."""
    if "npy_sha256" not in meta:
        return  # no sidecar, or one from crlf < 0.2 that did not record its .npy
    if len(raw) != meta.get("npy_bytes") or hashlib.sha256(raw).hexdigest() != meta["npy_sha256"]:
        raise InputError(f"{quoted(side)} does not describe {quoted(npy)} (written by another extract, or one that was "
                         f"interrupted): run crlf extract --out {npy} again")
