"""Downstream evaluation of an encoder: embeddings, the linear probe, weighted kNN, label subsets and fine-tuning.

Every protocol scores its test set through ``accuracy_report``, so top-1, top-5, per-class accuracy and the
confusion matrix are computed one way; each returns a small frozen dataclass (Accuracy, ClassifierResult,
KnnResult). Bad input raises InputError with one line saying what and how to fix.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import augment, progress
from crlf.engine.device import autocast, autocast_dtype, grad_scaler, make_generator
from crlf.engine.encoder import Encoder, check_images, prepare
from crlf.errors import InputError

log = logging.getLogger(__name__)

# fine-tuning's light augmentation: random resized crop of 50-100% of the area and a horizontal flip, no colour ops
FINETUNE_AUGMENT = augment.Augment(
    crop_min_scale=0.5, crop_max_scale=1.0, flip_p=0.5, jitter_strength=0.0, jitter_p=0.0, grayscale_p=0.0
)


@dataclass(frozen=True)
class Accuracy:
    """Top-1 / top-5 accuracy (percent), per-class accuracy (None for absent classes) and the confusion matrix
    (rows = true class, columns = predicted)."""

    top1: float
    top5: float
    per_class: list[float | None]
    confusion: list[list[int]]


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on raw features: logits = x @ weight.T + bias (on the CPU)."""

    weight: torch.Tensor  # float32 (C, D)
    bias: torch.Tensor  # float32 (C,)


@dataclass(frozen=True)
class ClassifierResult(Accuracy):
    """A trained classifier's test accuracy (linear probe, fine-tuning), how much it saw and how long it took;
    `head`: the linear probe itself when it was asked to keep it."""

    train_size: int
    test_size: int
    seconds: float
    head: LinearHead | None = None


@dataclass(frozen=True)
class KnnResult:
    """Weighted kNN's test accuracy (percent), the k and temperature it used, and how long it took."""

    top1: float
    top5: float
    k: int
    temperature: float
    seconds: float


# --- checks ---------------------------------------------------------------------------------------
def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise InputError(f"{name} must be positive, got {value}")


def _check_labels(y: torch.Tensor, n: int, num_classes: int, what: str) -> None:
    if y.ndim != 1 or len(y) != n or y.is_floating_point() or y.is_complex():
        raise InputError(f"{what}: expected {n:,} integer labels (one per row), got {y.dtype} {tuple(y.shape)}")
    if num_classes < 2:
        raise InputError(f"{what}: classification needs at least 2 classes, got num_classes={num_classes}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{what}: labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}; "
            "pass a num_classes above the largest label"
        )


def _check_features(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str, dim: int | None = None) -> None:
    if x.ndim != 2 or not x.is_floating_point() or len(x) == 0:
        raise InputError(f"{what} features: expected a non-empty float (N, D) matrix, got {x.dtype} {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(
            f"{what} features have {x.shape[1]} dimensions, train features {dim}: "
            "embed both splits with the same encoder"
        )
    if not bool(torch.isfinite(x).all()):
        raise InputError(
            f"{what} features contain NaN or infinite values: the encoder diverged; "
            "re-extract with a healthy checkpoint"
        )
    _check_labels(y, len(x), num_classes, what)


def _cosine(optimizer: torch.optim.Optimizer, base: list[float], step: int, total: int) -> None:
    """Set each param group's lr to its base value times the cosine factor of step / total (1 -> 0)."""
    factor = 0.5 * (1 + math.cos(math.pi * step / total))
    for group, lr in zip(optimizer.param_groups, base):
        group["lr"] = lr * factor


# --- metrics --------------------------------------------------------------------------------------
def accuracy_report(logits_or_scores: torch.Tensor, y: torch.Tensor, num_classes: int) -> Accuracy:
    """Top-1 / top-5 accuracy (percent), per-class accuracy (None for absent classes) and the confusion matrix
    (rows = true class, columns = predicted) of (N, C) scores, so every protocol reports the same way."""
    scores, y = logits_or_scores.detach().float().cpu(), y.detach().cpu().long()
    if scores.ndim != 2 or scores.shape[1] != num_classes or len(scores) != len(y) or len(y) == 0:
        raise InputError(f"scores {tuple(scores.shape)} do not match {len(y):,} labels of {num_classes} classes")
    _check_labels(y, len(scores), num_classes, "test")
    pred = scores.argmax(1)
    confusion = torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    counts, correct = confusion.sum(1).tolist(), confusion.diag().tolist()
    top5 = (scores.topk(min(5, num_classes), dim=1).indices == y[:, None]).any(1)
    return Accuracy(
        top1=100.0 * sum(correct) / len(y),
        top5=100.0 * int(top5.sum()) / len(y),
        per_class=[100.0 * c / n if n else None for c, n in zip(correct, counts)],
        confusion=confusion.tolist(),
    )


# --- protocols ------------------------------------------------------------------------------------
def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    device: torch.device,
    seed: int = 0,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float | None = None,
    weight_decay: float = 0.0,
    keep_head: bool = False,
) -> ClassifierResult:
    """Linear classification accuracy of frozen features: the standard measure of representation quality.

    Features are standardised per dimension with the train split's mean and std, then one zero-initialised
    nn.Linear is trained with cross-entropy by mini-batch SGD (momentum 0.9, cosine decay to 0 over `epochs`),
    the protocol of the SimCLR / MoCo CIFAR evaluations and solo-learn. It was chosen over full-batch L-BFGS
    because the result does not hinge on a tuned L2 penalty (L-BFGS without one runs its weights to infinity on
    separable features), every step is a fixed amount of work on the device, and the only randomness is the
    shuffling order, drawn from a seeded CPU generator: the same seed gives the same numbers on CPU.
    Default lr: 0.1 x batch / 256 on the standardised features (batch clipped to the train size).
    keep_head: also return the trained classifier as the result's `head` (on the CPU), the standardisation folded
    in, so that raw features x give the logits x @ weight.T + bias (``crlf explore``).
    """
    _check_features(train_x, train_y, num_classes, "train")
    _check_features(test_x, test_y, num_classes, "test", dim=train_x.shape[1])
    _positive(epochs=epochs, batch_size=batch_size, **({} if lr is None else {"lr": lr}))
    if weight_decay < 0:
        raise InputError(f"weight_decay must not be negative, got {weight_decay}")
    t0 = time.perf_counter()
    x, y = train_x.to(device, torch.float32), train_y.to(device, torch.long)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dimensions: centred, not blown up
    x = (x - mean) / std
    n, batch = len(x), min(batch_size, len(x))
    lr = 0.1 * batch / 256 if lr is None else lr
    head = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    steps, total = 0, epochs * math.ceil(n / batch)
    for epoch in range(epochs):
        progress.report("linear probe epoch", epoch, epochs)
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            _cosine(optimizer, [lr], steps, total)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    progress.report("linear probe epoch", epochs, epochs)
    with torch.no_grad():
        logits = head((test_x.to(device, torch.float32) - mean) / std)
    log.debug("linear probe: %d steps, lr %.4g, last batch loss %.4f", steps, lr, loss.detach())
    kept = None
    if keep_head:  # W ((x - mean) / std) + b = (W / std) x + (b - (W / std) mean)
        weight = head.weight.detach() / std
        kept = LinearHead(weight.cpu(), (head.bias.detach() - weight @ mean).cpu())
    return _classified(accuracy_report(logits, test_y, num_classes), n, len(test_x), t0, kept)


def _classified(
    accuracy: Accuracy, train_size: int, test_size: int, t0: float, head: LinearHead | None = None
) -> ClassifierResult:
    """A classifier's result from its test accuracy, its train / test sizes and its start time."""
    seconds = round(time.perf_counter() - t0, 3)
    return ClassifierResult(**dataclasses.asdict(accuracy), train_size=train_size, test_size=test_size,
                            seconds=seconds, head=head)  # fmt: skip


def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    device: torch.device,
    chunk: int = 1024,
) -> KnnResult:
    """Weighted kNN accuracy on cosine similarity (InstDisc, MoCo's monitor): a training-free check of the features.

    Each test row's k most similar train rows vote for their class with weight exp(similarity / temperature);
    the class with the largest sum wins. Test rows go in chunks so the full similarity matrix never exists.
    Weights are divided by the row's largest one (a common factor: same votes) so a small temperature cannot overflow.
    """
    _check_features(train_x, train_y, num_classes, "train")
    _check_features(test_x, test_y, num_classes, "test", dim=train_x.shape[1])
    _positive(k=k, temperature=temperature, chunk=chunk)
    t0 = time.perf_counter()
    k = min(k, len(train_x))
    train = F.normalize(train_x.to(device, torch.float32), dim=1)
    labels = train_y.to(device, torch.long)
    scores = torch.empty((len(test_x), num_classes), dtype=torch.float32)
    for i in range(0, len(test_x), chunk):
        query = F.normalize(test_x[i : i + chunk].to(device, torch.float32), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)  # sorted: column 0 holds each row's largest similarity
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros((len(query), num_classes), device=device).scatter_add_(1, labels[idx], weights)
        scores[i : i + len(query)] = votes.cpu()
        progress.report("kNN", i + len(query), len(test_x))
    report = accuracy_report(scores, test_y, num_classes)
    return KnnResult(report.top1, report.top5, k, temperature, round(time.perf_counter() - t0, 3))


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices of a class-balanced random subset (round(fraction x count), at least 1, per class), for
    label-efficiency curves; the same seed gives the same subset."""
    if not 0 < fraction <= 1:
        raise InputError(f"label fraction must lie in (0, 1], got {fraction}")
    if labels.ndim != 1 or labels.is_floating_point() or len(labels) == 0:
        raise InputError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().flatten()
        keep = max(1, round(fraction * len(rows)))
        picked.append(rows[torch.randperm(len(rows), generator=gen)[:keep]])
    return torch.cat(picked).sort().values.to(torch.int64)


def finetune(
    encoder: Encoder,
    train_images: torch.Tensor,
    train_y: torch.Tensor,
    test_images: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    device: torch.device,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.05,
    encoder_lr_scale: float = 0.1,
    seed: int = 0,
    precision: str = "auto",
) -> ClassifierResult:
    """Fine-tuning accuracy: a copy of the encoder is trained with a new linear head on the labelled images.

    The other downstream protocol (SimCLR's semi-supervised table): light augmentation (random resized crop of
    50-100% of the area, horizontal flip), cross-entropy, SGD momentum 0.9 with cosine decay, the encoder at
    lr x encoder_lr_scale and the head at lr, bf16 autocast on CUDA under precision 'auto'. Batches are full (the
    remainder of an epoch is dropped) so BatchNorm never sees a batch of one. Test images are embedded un-augmented
    in eval mode. The caller's encoder is left unchanged. Returns the same fields as linear_probe (no head).
    """
    check_images(train_images, "fine-tuning train")
    check_images(test_images, "fine-tuning test")
    _check_labels(train_y, len(train_images), num_classes, "fine-tuning train")
    _check_labels(test_y, len(test_images), num_classes, "fine-tuning test")
    _positive(epochs=epochs, batch_size=batch_size, lr=lr, encoder_lr_scale=encoder_lr_scale)
    if len(train_images) < 2:
        raise InputError(
            "fine-tuning needs at least 2 labelled train images (BatchNorm trains on batch statistics); "
            "use a larger label fraction"
        )
    t0 = time.perf_counter()
    tuned = dataclasses.replace(encoder, backbone=copy.deepcopy(encoder.backbone).to(device))
    model = tuned.backbone
    mean, std = encoder.normaliser(device)
    head = nn.Linear(encoder.feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    base = [lr * encoder_lr_scale, lr]
    optimizer = torch.optim.SGD(
        [{"params": model.parameters(), "lr": base[0]}, {"params": head.parameters(), "lr": base[1]}], momentum=0.9
    )
    images, y = train_images.to(device), train_y.to(device, torch.long)
    n, (h, w) = len(images), images.shape[-2:]
    batch = min(batch_size, n)
    per_epoch = n // batch
    total, steps = epochs * per_epoch, 0
    augment_gen, order = make_generator(device, seed), torch.Generator().manual_seed(seed)
    dtype = autocast_dtype(device, precision)
    scaler = grad_scaler(device, dtype)  # fp16: loss scaling, a step with an overflow skipped
    model.train()
    progress.report("fine-tuning", 0, total)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for s in range(per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            x = augment.apply(images[idx], augment.sample_params(batch, h, w, FINETUNE_AUGMENT, augment_gen), min(h, w))
            _cosine(optimizer, base, steps, total)
            with autocast(device, dtype):
                loss = F.cross_entropy(head(model(prepare(x, mean, std))).float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            steps += 1
            progress.report("fine-tuning", steps, total)
    features = tuned.features(test_images, precision=precision)
    with torch.no_grad():
        logits = head(features.to(device))
    log.debug("fine-tuning: %d steps, last batch loss %.4f", steps, loss.detach())
    return _classified(accuracy_report(logits, test_y, num_classes), n, len(test_images), t0)
