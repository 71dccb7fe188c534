"""Embedding files and the evaluation commands' plumbing: extract to .npy / .npz with provenance, read them
back, and run the linear / kNN protocols on a checkpoint + data or on files written by ``extract``.

Files: ``emb.npy`` (float32 N x D) with ``emb.npy.json`` beside it (provenance, ids, labels), or one ``emb.npz``
holding ``embeddings``, ``labels`` (when known), ``ids``, ``class_names`` and ``provenance`` (a JSON string).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from crlf import __version__
from crlf.engine import evaluate, sources
from crlf.engine.checkpoint import save_tensors
from crlf.engine.device import select_device
from crlf.engine.encoder import Encoder, load_encoder
from crlf.engine.files import atomic_write, check_writable, os_failure
from crlf.engine.sources.arrays import label_bound_problem
from crlf.engine.sources.squares import SquareStream, open_images
from crlf.errors import InputError, quoted
from crlf.options import DataSettings
from crlf.settings import EmbedSettings, EncoderInput, ExtractSettings, KnnEvalSettings, LinearEvalSettings, resolve

log = logging.getLogger(__name__)
PROBE_FORMAT = "crlf-linear-probe"  # linear-eval's classifier on raw features: weight (C, D), bias (C,)


def _open_encoder(settings: EncoderInput, device: torch.device) -> Encoder:
    assert settings.ckpt is not None
    return load_encoder(settings.ckpt.expanduser(), device)


def encoder_data(settings: DataSettings, encoder: Encoder) -> DataSettings:
    """The data settings with the encoder's image size unless the user chose one."""
    return settings.model_copy(update={"image_size": settings.image_size or encoder.image_size})


def embed_images(settings: EncoderInput, encoder: Encoder, images: sources.ImageSet | SquareStream) -> torch.Tensor:
    """Features of a data set in memory or streamed (float32 N x D on the CPU; streamed: one row per readable image)
    at the settings' precision, with a log line of how long it took."""
    t0 = time.perf_counter()
    precision = getattr(settings, "precision", "auto")
    pixels = images if isinstance(images, SquareStream) else images.images
    x = encoder.features(pixels, batch_size=settings.embed_batch_size, precision=precision, total=len(images))
    log.info(
        "embedded %s %s image%s in %.1f s (%d dims)",
        f"{len(x):,}",
        images.source,
        "" if len(x) == 1 else "s",
        time.perf_counter() - t0,
        x.shape[1],
    )
    return x


@dataclass
class Embeddings:
    """Embeddings of a data set in its row order, with what is known about the rows and where they came from."""

    x: torch.Tensor  # float32 (N, D) on the CPU
    labels: torch.Tensor | None  # int64 (N,), or None for unlabelled data
    ids: list[str]  # image ids / file paths, row by row
    class_names: list[str]
    provenance: dict[str, Any]


def embed(ckpt: str | Path, **options: Any) -> Embeddings:
    """``crlf extract`` without files: embed a data set with a saved encoder.

    options are extract's settings: data, data_dir, split, image_size, limit, device, embed_batch_size, normalize, ...
    e.g. ``crlf.embed("runs/c10/encoder.safetensors", data="cifar10", data_dir="~/data", split="test")``.
    """
    return _embed(resolve(EmbedSettings, {"ckpt": ckpt, **options}))


def _embed(settings: EmbedSettings) -> Embeddings:
    device = select_device(settings.device)
    encoder = _open_encoder(settings, device)
    data_settings = encoder_data(settings, encoder)
    images = open_images(data_settings, settings.split, settings.embed_batch_size)
    x = embed_images(settings, encoder, images)
    bad = int((~torch.isfinite(x).all(dim=1)).sum())
    if bad:
        raise InputError(f"{quoted(settings.ckpt)} gives NaN or infinite embeddings for {bad:,} of {len(x):,} "
                         "images: the encoder diverged in training; use an earlier checkpoint "
                         "(checkpoints/epoch-*.safetensors)")
    if settings.normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    provenance = {
        "crlf_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(settings.ckpt),
        "checkpoint_sha256": encoder.sha256,  # of the bytes the weights were loaded from
        "data": settings.data,
        "data_dir": None if settings.data_dir is None else str(settings.data_dir),
        "split": settings.split or ("train+unlabeled" if settings.data == "stl10" else "train"),
        "source": images.source,
        "count": len(x),
        "dim": x.shape[1],
        "l2_normalized": settings.normalize,
        "image_size": data_settings.image_size,
        "mean": encoder.mean,
        "std": encoder.std,
        "arch": encoder.arch,
        "backbone": json.loads(encoder.spec.to_json()),
    }
    return Embeddings(x, images.labels, images.ids, images.class_names, provenance)


def extract(settings: ExtractSettings, stdout: BinaryIO | None = None) -> dict[str, Any]:
    """Embed a data set with a saved encoder and write it (``--out -``: the .npy goes to `stdout`); returns a
    summary."""
    out = None if settings.out == "-" else Path(settings.out).expanduser()
    if out is not None:  # fail before embedding, not after
        check_writable(out, "--out")
    emb = _embed(settings)
    arr = emb.x.numpy()
    if out is None:
        assert stdout is not None, "--out - needs a stream"
        np.save(stdout, arr)
        stdout.flush()
    else:
        _write_embeddings(out, arr, emb)
    return {
        "out": settings.out,
        "count": len(arr),
        "dim": arr.shape[1],
        "labels": emb.labels is not None,
        "sidecar": None if out is None or out.suffix == ".npz" else str(out) + ".json",
        "source": emb.provenance["source"],
    }


def _write_embeddings(out: Path, arr: np.ndarray, emb: Embeddings) -> None:
    """.npz: everything in one file; .npy: the array, then its JSON sidecar (each written atomically)."""
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


def _labelled(
    settings: KnnEvalSettings | LinearEvalSettings, device: torch.device, features: bool = True
) -> dict[str, Any]:
    """Train and test labels with their features, from a checkpoint + data or from two embeddings files.

    features=False (fine-tuning, which trains on the images): the encoder and the loaded images instead of features.
    """
    if settings.ckpt is not None:
        if not features and settings.stream:
            raise InputError("linear-eval --finetune trains on the images in memory or their memory-mapped cache: "
                             "drop --stream")  # fmt: skip
        encoder = _open_encoder(settings, device)
        data_settings = encoder_data(settings, encoder)
        if features:
            train_x, train = _embed_split(settings, encoder, data_settings, settings.split)
            test_x, test = _embed_split(settings, encoder, data_settings, "test")
        else:
            train, test = sources.load(data_settings, settings.split), sources.load(data_settings, "test")
        parts = {
            "train_y": train.labels,
            "test_y": test.labels,
            "class_names": train.class_names,
            "source": {"checkpoint": str(settings.ckpt), "data": train.source},
            "train_size": len(train_x) if features else len(train),
            "test_size": len(test_x) if features else len(test),
            "dim": encoder.feature_dim,
            "checkpoint_sha256": encoder.sha256,
        }
        if features:
            parts.update(train_x=train_x, test_x=test_x)
        else:
            parts.update(encoder=encoder, train_images=train.images, test_images=test.images)
    else:
        assert settings.train_emb is not None and settings.test_emb is not None
        train_x, train_y, names, prov = read_embeddings(settings.train_emb)
        test_x, test_y, _, _ = read_embeddings(settings.test_emb)
        parts = {
            "train_x": train_x,
            "train_y": train_y,
            "test_x": test_x,
            "test_y": test_y,
            "class_names": names,
            "source": {
                "train_emb": str(settings.train_emb),
                "test_emb": str(settings.test_emb),
                "checkpoint": prov.get("checkpoint"),
            },
            "train_size": len(train_x),
            "test_size": len(test_x),
            "dim": train_x.shape[1],
            "checkpoint_sha256": prov.get("checkpoint_sha256"),
        }
    for split in ("train", "test"):
        if parts[f"{split}_y"] is None:
            raise InputError(
                f"the {split} split has no labels: evaluation needs a labelled data set "
                "(class sub-folders, CIFAR, STL-10 train/test, npz with labels)"
            )
    if features and parts["train_x"].shape[1] != parts["test_x"].shape[1]:
        raise InputError(
            f"train and test embeddings differ in size ({parts['train_x'].shape[1]} vs {parts['test_x'].shape[1]}): "
            "extract both with the same checkpoint"
        )
    parts["num_classes"] = int(max(parts["train_y"].max(), parts["test_y"].max())) + 1
    parts["class_names"] = parts["class_names"] or [str(i) for i in range(parts["num_classes"])]
    return parts


def _embed_split(
    settings: EncoderInput, encoder: Encoder, data_settings: DataSettings, split: str | None
) -> tuple[torch.Tensor, sources.ImageSet | SquareStream]:
    """A split's features and its images (in memory) or stream (whose ids and labels are the rows embedded)."""
    images = open_images(data_settings, split, settings.embed_batch_size)
    return embed_images(settings, encoder, images), images


def linear_eval(settings: LinearEvalSettings) -> dict[str, Any]:
    """The linear probe (or fine-tuning) over every label fraction x seed; mean and std per fraction."""
    _check_results(settings, "finetune" if settings.finetune else "linear")
    device = select_device(settings.device)
    parts = _labelled(settings, device, features=not settings.finetune)
    runs, head = [], None
    for fraction in settings.label_fraction:
        for seed in range(settings.seed, settings.seed + settings.seeds):
            idx = (
                evaluate.balanced_subset(parts["train_y"], fraction, seed)
                if fraction < 1
                else torch.arange(len(parts["train_y"]))
            )
            if settings.finetune:  # evaluate.finetune trains a copy: the one encoder serves every run
                result = evaluate.finetune(
                    parts["encoder"],
                    parts["train_images"][idx],
                    parts["train_y"][idx],
                    parts["test_images"],
                    parts["test_y"],
                    parts["num_classes"],
                    device=device,
                    epochs=settings.probe_epochs,
                    seed=seed,
                    precision=settings.precision,
                    **({"lr": settings.probe_lr} if settings.probe_lr else {}),
                )
            else:
                result = evaluate.linear_probe(
                    parts["train_x"][idx],
                    parts["train_y"][idx],
                    parts["test_x"],
                    parts["test_y"],
                    parts["num_classes"],
                    device=device,
                    seed=seed,
                    epochs=settings.probe_epochs,
                    lr=settings.probe_lr,
                    weight_decay=settings.probe_weight_decay,
                    keep_head=fraction == 1 and seed == settings.seed,  # the full-label run's probe is saved
                )
                head = result.pop("head", head)
            log.info(
                "label fraction %g, seed %d: top-1 %.2f%%  top-5 %.2f%%  (%s train image%s, %.1f s)",
                fraction,
                seed,
                result["top1"],
                result["top5"],
                f"{len(idx):,}",
                "" if len(idx) == 1 else "s",
                result["seconds"],
            )
            runs.append({"fraction": fraction, "seed": seed, **result})
    return _report("finetune" if settings.finetune else "linear", settings, parts, runs, head)


def knn_eval(settings: KnnEvalSettings) -> dict[str, Any]:
    """Weighted kNN (cosine, k neighbours, temperature) on the test split."""
    _check_results(settings, "knn")
    device = select_device(settings.device)
    parts = _labelled(settings, device)
    if settings.k > parts["train_size"]:  # knn_classify clips k: say so, the result would read as k's
        log.warning("-k %d is more than the %s training images: using k = %s", settings.k,
                    f"{parts['train_size']:,}", f"{parts['train_size']:,}")  # fmt: skip
    result = evaluate.knn_classify(
        parts["train_x"],
        parts["train_y"],
        parts["test_x"],
        parts["test_y"],
        parts["num_classes"],
        k=settings.k,
        temperature=settings.knn_temperature,
        device=device,
    )
    return _report("knn", settings, parts, [{"fraction": 1.0, "seed": 0, **result}])


def _results_path(settings: KnnEvalSettings | LinearEvalSettings, protocol: str) -> Path | None:
    """Where the results go: --results, else the run directory of the checkpoint, else nowhere; checked for
    writability by the caller before any work."""
    if settings.results is not None:
        return settings.results.expanduser()
    ckpt = settings.ckpt.expanduser() if settings.ckpt is not None else None
    if ckpt is not None and (ckpt.parent / "config.json").is_file():
        return ckpt.parent / f"{'knn' if protocol == 'knn' else 'linear'}_eval.json"
    return None


def _check_results(settings: KnnEvalSettings | LinearEvalSettings, protocol: str) -> None:
    target = _results_path(settings, protocol)
    if target is not None:
        check_writable(target, "--results")


def _report(
    protocol: str,
    settings: KnnEvalSettings | LinearEvalSettings,
    parts: dict[str, Any],
    runs: list[dict[str, Any]],
    head: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The result document: every run, mean / std per label fraction, the main run's details; saved when asked or
    known, with the full-label linear probe's weights (`head`) beside it as ``<results>_probe.safetensors``."""
    summary = []
    for fraction in dict.fromkeys(r["fraction"] for r in runs):
        group = [r for r in runs if r["fraction"] == fraction]
        stats = {
            m: (round(statistics.fmean(r[m] for r in group), 4), round(statistics.pstdev(r[m] for r in group), 4))
            for m in ("top1", "top5")
        }
        summary.append(
            {
                "fraction": fraction,
                "runs": len(group),
                "top1_mean": stats["top1"][0],
                "top1_std": stats["top1"][1],
                "top5_mean": stats["top5"][0],
                "top5_std": stats["top5"][1],
            }
        )
    main = max(runs, key=lambda r: r["fraction"])
    result = {
        "protocol": protocol,
        **parts["source"],
        "train_size": parts["train_size"],
        "test_size": parts["test_size"],
        "dim": parts["dim"],
        "class_names": parts["class_names"],
        "top1": main["top1"],
        "top5": main["top5"],
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k not in ("confusion", "per_class")} for r in runs],
    }
    if "confusion" in main:
        result["per_class"], result["confusion"] = main["per_class"], main["confusion"]
    target = _results_path(settings, protocol)
    if target is not None:
        try:
            atomic_write(target, lambda f: f.write(json.dumps(result, indent=1).encode()))
            if "confusion" in result:
                conf = np.asarray(result["confusion"], dtype=np.int64)
                atomic_write(Path(str(target).removesuffix(".json") + "_confusion.npy"), lambda f: np.save(f, conf))
            probe = Path(str(target).removesuffix(".json") + "_probe.safetensors")
            if head is not None:  # crlf explore predicts uploads' classes with it
                meta = {"format": PROBE_FORMAT, "class_names": json.dumps(parts["class_names"])}
                sha = parts.get("checkpoint_sha256")
                save_tensors(probe, head, {**meta, **({"checkpoint_sha256": sha} if sha else {})})
                result["probe_file"] = str(probe)
            elif protocol != "knn":  # a probe of earlier results would no longer belong to these
                probe.unlink(missing_ok=True)
        except OSError as e:
            raise os_failure(e, str(target), "choose a writable --results") from None
        result["results_file"] = str(target)
        log.info("results written to %s", target)
    return result
