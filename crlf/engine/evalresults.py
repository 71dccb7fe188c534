"""The results of linear-eval / knn-eval: one JSON document (every run, mean / std per label fraction, the main run's
details), written with the confusion matrix and the full-label linear probe beside it."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crlf.engine.checkpoint import save_tensors
from crlf.engine.evaluate import ClassifierResult, KnnResult, LinearHead
from crlf.engine.files import atomic_write, os_failure

log = logging.getLogger(__name__)
PROBE_FORMAT = "crlf-linear-probe"  # linear-eval's classifier on raw features: weight (C, D), bias (C,)
_DETAILS = ("per_class", "confusion", "head")  # of the main run only, not of every run


@dataclass(frozen=True)
class Evaluated:
    """What an evaluation ran on: where its rows came from (the document's first keys), their number and width."""

    source: dict[str, str | None]  # checkpoint + data, or the two embeddings files and their checkpoint
    train_size: int
    test_size: int
    dim: int
    class_names: list[str]
    checkpoint_sha256: str | None


@dataclass(frozen=True)
class Run:
    """One protocol run: its label fraction, its seed and what it measured."""

    fraction: float
    seed: int
    result: ClassifierResult | KnnResult

    def row(self) -> dict[str, Any]:
        """The run as the document lists it: fraction, seed, then the result's numbers (no per-class details)."""
        names = [f.name for f in dataclasses.fields(self.result) if f.name not in _DETAILS]
        found = {name: getattr(self.result, name) for name in names}
        return {"fraction": self.fraction, "seed": self.seed, **found}


def _summary(runs: list[Run]) -> list[dict[str, Any]]:
    """Mean and std of top-1 / top-5 per label fraction, in the runs' order."""
    summary = []
    for fraction in dict.fromkeys(r.fraction for r in runs):
        group = [r.result for r in runs if r.fraction == fraction]
        stats = {
            m: (round(statistics.fmean(getattr(r, m) for r in group), 4),
                round(statistics.pstdev(getattr(r, m) for r in group), 4))
            for m in ("top1", "top5")
        }  # fmt: skip
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
    return summary


def report(
    protocol: str, about: Evaluated, runs: list[Run], target: Path | None, head: LinearHead | None = None
) -> dict[str, Any]:
    """The result document; written to `target` when there is one, with the full-label linear probe's weights
    (`head`) beside it as ``<results>_probe.safetensors``."""
    main = max(runs, key=lambda r: r.fraction).result
    result = {
        "protocol": protocol,
        **about.source,
        "train_size": about.train_size,
        "test_size": about.test_size,
        "dim": about.dim,
        "class_names": about.class_names,
        "top1": main.top1,
        "top5": main.top5,
        "summary": _summary(runs),
        "runs": [r.row() for r in runs],
    }
    if isinstance(main, ClassifierResult):
        result["per_class"], result["confusion"] = main.per_class, main.confusion
    if target is not None:
        _write(protocol, about, result, target, head)
    return result


def _write(protocol: str, about: Evaluated, result: dict[str, Any], target: Path, head: LinearHead | None) -> None:
    """The document, its confusion matrix as .npy and the probe (or no stale probe), each atomically."""
    try:
        atomic_write(target, lambda f: f.write(json.dumps(result, indent=1).encode()))
        if "confusion" in result:
            conf = np.asarray(result["confusion"], dtype=np.int64)
            atomic_write(Path(str(target).removesuffix(".json") + "_confusion.npy"), lambda f: np.save(f, conf))
        probe = Path(str(target).removesuffix(".json") + "_probe.safetensors")
        if head is not None:  # crlf explore predicts uploads' classes with it
            meta = {"format": PROBE_FORMAT, "class_names": json.dumps(about.class_names)}
            sha = about.checkpoint_sha256
            tensors = {"weight": head.weight, "bias": head.bias}
            save_tensors(probe, tensors, {**meta, **({"checkpoint_sha256": sha} if sha else {})})
            result["probe_file"] = str(probe)
        elif protocol != "knn":  # a probe of earlier results would no longer belong to these
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise os_failure(e, str(target), "choose a writable --results") from None
    result["results_file"] = str(target)
    log.info("results written to %s", target)
