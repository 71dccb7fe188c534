"""``crlf linear-eval`` / ``crlf knn-eval``: the labelled rows from a checkpoint + data or from two embeddings files,
the protocols of crlf.engine.evaluate over every label fraction x seed, and the results document
(crlf.engine.evalresults) in --results or the checkpoint's run directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crlf.commands.extract import embed_split, encoder_data, open_encoder
from crlf.engine import evaluate, sources, trackers
from crlf.engine.device import select_device
from crlf.engine.embedfile import read_embeddings
from crlf.engine.encoder import Encoder
from crlf.engine.evalresults import Evaluated, Run, report
from crlf.engine.evaluate import LinearHead
from crlf.engine.files import check_writable
from crlf.engine.rundir import RunDir
from crlf.errors import InputError
from crlf.settings import KnnEvalSettings, LinearEvalSettings

log = logging.getLogger(__name__)


@dataclass
class _Labelled:
    """Train and test labels with their features (or, for fine-tuning, the encoder and the images), and what they
    are."""

    about: Evaluated
    train_y: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_x: torch.Tensor | None = None
    test_x: torch.Tensor | None = None
    encoder: Encoder | None = None
    train_images: torch.Tensor | None = None
    test_images: torch.Tensor | None = None


def _labelled(settings: KnnEvalSettings | LinearEvalSettings, device: torch.device, features: bool = True) -> _Labelled:
    """Train and test labels with their features, from a checkpoint + data or from two embeddings files.

    features=False (fine-tuning, which trains on the images): the encoder and the loaded images instead of features.
    """
    encoder = train_x = test_x = None
    if settings.ckpt is not None:
        if not features and settings.stream:
            raise InputError("linear-eval --finetune trains on the images in memory or their memory-mapped cache: "
                             "drop --stream")  # fmt: skip
        encoder = open_encoder(settings, device)
        data_settings = encoder_data(settings, encoder)
        if features:
            batch, precision = settings.embed_batch_size, settings.precision
            train_x, train = embed_split(encoder, data_settings, settings.split, batch, precision)
            test_x, test = embed_split(encoder, data_settings, "test", batch, precision)
        else:
            train, test = sources.load(data_settings, settings.split), sources.load(data_settings, "test")
        train_y, test_y, names = train.labels, test.labels, train.class_names
        source: dict[str, str | None] = {"checkpoint": str(settings.ckpt), "data": train.source}
        sizes = (len(train_x), len(test_x)) if features else (len(train), len(test))  # type: ignore[arg-type]
        dim, sha = encoder.feature_dim, encoder.sha256
    else:
        assert settings.train_emb is not None and settings.test_emb is not None
        train_x, train_y, names, prov = read_embeddings(settings.train_emb)
        test_x, test_y, _, _ = read_embeddings(settings.test_emb)
        source = {
            "train_emb": str(settings.train_emb),
            "test_emb": str(settings.test_emb),
            "checkpoint": prov.get("checkpoint"),
        }
        sizes, dim, sha = (len(train_x), len(test_x)), train_x.shape[1], prov.get("checkpoint_sha256")
    for split, y in (("train", train_y), ("test", test_y)):
        if y is None:
            raise InputError(
                f"the {split} split has no labels: evaluation needs a labelled data set "
                "(class sub-folders, CIFAR, STL-10 train/test, npz with labels)"
            )
    assert train_y is not None and test_y is not None
    if train_x is not None and test_x is not None and train_x.shape[1] != test_x.shape[1]:
        raise InputError(
            f"train and test embeddings differ in size ({train_x.shape[1]} vs {test_x.shape[1]}): "
            "extract both with the same checkpoint"
        )
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    about = Evaluated(source, *sizes, dim, names or [str(i) for i in range(num_classes)], sha)
    if features:
        return _Labelled(about, train_y, test_y, num_classes, train_x=train_x, test_x=test_x)
    return _Labelled(about, train_y, test_y, num_classes, encoder=encoder, train_images=train.images,
                     test_images=test.images)  # fmt: skip


def linear_eval(settings: LinearEvalSettings) -> dict[str, Any]:
    """The linear probe (or fine-tuning) over every label fraction x seed; mean and std per fraction."""
    protocol = "finetune" if settings.finetune else "linear"
    target = _results_path(settings, protocol)
    device = select_device(settings.device)
    parts = _labelled(settings, device, features=not settings.finetune)
    runs: list[Run] = []
    head: LinearHead | None = None
    for fraction in settings.label_fraction:
        for seed in range(settings.seed, settings.seed + settings.seeds):
            idx = (
                evaluate.balanced_subset(parts.train_y, fraction, seed)
                if fraction < 1
                else torch.arange(len(parts.train_y))
            )
            if settings.finetune:  # evaluate.finetune trains a copy: the one encoder serves every run
                assert parts.encoder is not None and parts.train_images is not None and parts.test_images is not None
                result = evaluate.finetune(
                    parts.encoder,
                    parts.train_images[idx],
                    parts.train_y[idx],
                    parts.test_images,
                    parts.test_y,
                    parts.num_classes,
                    device=device,
                    epochs=settings.probe_epochs,
                    seed=seed,
                    precision=settings.precision,
                    **({"lr": settings.probe_lr} if settings.probe_lr else {}),
                )
            else:
                assert parts.train_x is not None and parts.test_x is not None
                result = evaluate.linear_probe(
                    parts.train_x[idx],
                    parts.train_y[idx],
                    parts.test_x,
                    parts.test_y,
                    parts.num_classes,
                    device=device,
                    seed=seed,
                    epochs=settings.probe_epochs,
                    lr=settings.probe_lr,
                    weight_decay=settings.probe_weight_decay,
                    keep_head=fraction == 1 and seed == settings.seed,  # the full-label run's probe is saved
                )
                head = result.head or head
            log.info(
                "label fraction %g, seed %d: top-1 %.2f%%  top-5 %.2f%%  (%s train image%s, %.1f s)",
                fraction,
                seed,
                result.top1,
                result.top5,
                f"{len(idx):,}",
                "" if len(idx) == 1 else "s",
                result.seconds,
            )
            runs.append(Run(fraction, seed, result))
    return _tracked(settings, protocol, report(protocol, parts.about, runs, target, head))


def knn_eval(settings: KnnEvalSettings) -> dict[str, Any]:
    """Weighted kNN (cosine, k neighbours, temperature) on the test split."""
    target = _results_path(settings, "knn")
    device = select_device(settings.device)
    parts = _labelled(settings, device)
    assert parts.train_x is not None and parts.test_x is not None
    train_size = parts.about.train_size
    if settings.k > train_size:  # knn_classify clips k: say so, the result would read as k's
        log.warning("-k %d is more than the %s training images: using k = %s", settings.k, f"{train_size:,}",
                    f"{train_size:,}")  # fmt: skip
    result = evaluate.knn_classify(
        parts.train_x,
        parts.train_y,
        parts.test_x,
        parts.test_y,
        parts.num_classes,
        k=settings.k,
        temperature=settings.knn_temperature,
        device=device,
    )
    return _tracked(settings, "knn", report("knn", parts.about, [Run(1.0, 0, result)], target))


def _tracked(settings: KnnEvalSettings | LinearEvalSettings, protocol: str, result: dict[str, Any]) -> dict[str, Any]:
    """The result, also logged to the trackers of the run directory the checkpoint is in (when it recorded some)."""
    if settings.ckpt is not None:
        run = RunDir(settings.ckpt.expanduser().parent)
        if run.config.is_file() and run.is_ours():
            trackers.log_evaluation(run, protocol, result)
    return result


def _results_path(settings: KnnEvalSettings | LinearEvalSettings, protocol: str) -> Path | None:
    """Where the results go: --results, else the run directory of the checkpoint, else nowhere; checked for
    writability before any work."""
    ckpt = settings.ckpt.expanduser() if settings.ckpt is not None else None
    target = None
    if settings.results is not None:
        target = settings.results.expanduser()
    elif ckpt is not None and (ckpt.parent / "config.json").is_file():
        target = ckpt.parent / f"{'knn' if protocol == 'knn' else 'linear'}_eval.json"
    if target is not None:
        check_writable(target, "--results")
    return target
