"""The evaluation engine: embeddings, linear probe, weighted kNN, class-balanced subsets and fine-tuning."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crlf.engine import backbones
from crlf.engine.encoder import Encoder
from crlf.engine.evaluate import accuracy_report, balanced_subset, finetune, knn_classify, linear_probe
from crlf.errors import InputError

CPU = torch.device("cpu")


def encoder_of(net=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=8):
    """`net` (default: a fresh CIFAR-stem ResNet-18) as an Encoder of `size` px images."""
    spec = backbones.spec_for("resnet18", size, "cifar")
    return Encoder(backbones.build(spec) if net is None else net, spec, list(mean), list(std))


def embed(encoder, images, batch_size):
    return encoder.features(images, batch_size=batch_size)


def random_images(n, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def blobs(n, classes=10, dim=64, spread=10.0, seed=0):
    """Gaussian blobs: unit noise around class centres drawn with std `spread` (seed 0 fixes the centres)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * spread
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, dim, generator=gen), y


class MeanPool(nn.Module):
    """A stand-in encoder whose features are the per-channel means of its (normalised) input."""

    def forward(self, x):
        return x.mean((2, 3))


def small_bn_net():
    """A conv + BatchNorm net with 512 features (ResNet-18's width): what eval mode, batch-size invariance and
    fine-tuning need of a backbone, at a hundredth of ResNet-18's cost (the suite's time, issue 38)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 512),
    )


# --- embed ------------------------------------------------------------------------------------------
def test_embed_is_eval_mode_batch_size_invariant_and_in_input_order():
    torch.manual_seed(0)
    net = small_bn_net().train()  # embed must switch to eval itself, and switch back
    encoder, buffers = encoder_of(net), {k: v.clone() for k, v in net.state_dict().items()}
    images = random_images(64)
    out = embed(encoder, images, batch_size=64)
    assert out.dtype == torch.float32 and out.shape == (64, 512) and out.device.type == "cpu"
    assert not torch.allclose(out[0], out[1])  # different images, different rows
    for batch_size in (1, 7):
        assert torch.allclose(embed(encoder, images, batch_size=batch_size), out, atol=1e-5)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(embed(encoder, images[perm], batch_size=7), out[perm], atol=1e-5)
    assert net.training  # the caller's mode is restored
    assert all(torch.equal(v, buffers[k]) for k, v in net.state_dict().items())  # BatchNorm statistics untouched
    floats = embed(encoder, images.float() / 255, batch_size=64)  # float input in [0, 1]: the same rows
    assert torch.allclose(floats, out, atol=1e-5)


def test_embed_scales_to_unit_range_and_normalises_with_the_encoders_mean_and_std():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    images = random_images(10, size=12)
    expected = (
        (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ).mean((2, 3))
    assert torch.allclose(embed(encoder_of(MeanPool(), mean, std, 12), images, batch_size=3), expected, atol=1e-5)


def test_embed_rejects_what_it_cannot_embed():
    encoder = encoder_of(MeanPool())
    with pytest.raises(InputError, match="too small"):
        embed(encoder, random_images(4, size=7), 4)
    with pytest.raises(InputError, match="uint8 or float"):
        embed(encoder, random_images(4).to(torch.int32), 4)
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        embed(encoder, random_images(4)[:, :1], 4)
    with pytest.raises(InputError, match="batch_size must be positive"):
        embed(encoder, random_images(4), 0)


# --- accuracy_report and the linear probe -------------------------------------------------------------
def test_accuracy_report_counts():
    scores = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    report = accuracy_report(scores, torch.tensor([0, 2, 2, 1]), 3)
    assert report.top1 == 50.0 and report.top5 == 100.0
    assert report.confusion == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert report.per_class == [100.0, 0.0, 50.0]


def test_linear_probe_separates_blobs_and_reports_consistently():
    train_x, train_y = blobs(1000)
    test_x, test_y = blobs(500, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, 10, device=CPU, seed=0)
    assert result.top1 >= 99 and result.top5 >= result.top1
    conf = torch.tensor(result.confusion)
    assert (
        conf.shape == (10, 10)
        and conf.sum() == 500
        and conf.sum(1).tolist() == torch.bincount(test_y, minlength=10).tolist()
    )
    assert math.isclose(100 * conf.diag().sum().item() / 500, result.top1)
    assert len(result.per_class) == 10 and min(result.per_class) >= 90
    assert result.train_size == 1000 and result.test_size == 500 and result.seconds >= 0
    again = linear_probe(train_x, train_y, test_x, test_y, 10, device=CPU, seed=0)
    assert dataclasses.replace(again, seconds=0.0) == dataclasses.replace(result, seconds=0.0)


def test_linear_probe_on_random_labels_is_at_chance():
    gen = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(1000, 64, generator=gen), torch.randn(500, 64, generator=gen)
    train_y, test_y = torch.randint(0, 10, (1000,), generator=gen), torch.randint(0, 10, (500,), generator=gen)
    result = linear_probe(train_x, train_y, test_x, test_y, 10, device=CPU, seed=0)
    assert 4 <= result.top1 <= 16


def test_linear_probe_standardises_with_train_statistics():
    # the class signal lives in 16 dimensions of scale 1e-3, next to 16 dimensions of pure noise of scale 1e3, all far
    # from the origin: only standardised features train in 30 epochs. The test set holds class 0 alone, so standardising
    # it with its own mean would erase the signal. Absent classes get None; with 3 classes top-5 is 100.
    def features(n, seed):
        x, y = blobs(n, classes=3, dim=16, seed=seed)
        noise = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed + 10))
        return torch.cat([x * 1e-3, noise * 1e3], 1) + 1000, y

    train_x, train_y = features(600, 0)
    test_x, test_y = features(300, 1)
    keep = test_y == 0
    result = linear_probe(train_x, train_y, test_x[keep], test_y[keep], 3, device=CPU, epochs=30)
    assert result.top1 >= 99 and result.top5 == 100.0 and result.per_class[0] == result.top1
    assert result.per_class[1:] == [None, None] and result.confusion[1:] == [[0, 0, 0], [0, 0, 0]]


def test_linear_probe_rejects_bad_input():
    x, y = blobs(20, classes=3, dim=4)
    with pytest.raises(InputError, match="outside 0..2"):
        linear_probe(x, y + 1, x, y, 3, device=CPU)
    with pytest.raises(InputError, match="dimensions"):
        linear_probe(x, y, x[:, :3], y, 3, device=CPU)
    with pytest.raises(InputError, match="NaN"):
        linear_probe(x.masked_fill(x > 5, float("nan")), y, x, y, 3, device=CPU)


# --- kNN ----------------------------------------------------------------------------------------------
def knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
    """Brute force: the full similarity matrix, then a Python loop over every test row's k nearest train rows."""
    sim = F.normalize(test_x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T
    scores = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i in range(len(test_x)):
        for j in sim[i].argsort(descending=True)[: min(k, len(train_x))].tolist():
            scores[i, train_y[j]] += math.exp(sim[i, j].item() / temperature)
    return scores


@pytest.mark.parametrize(("k", "temperature", "chunk"), [(1, 0.1, 7), (10, 0.05, 33), (50, 0.5, 1), (10_000, 0.1, 64)])
def test_knn_matches_brute_force(k, temperature, chunk):
    train_x, train_y = blobs(300, dim=16, spread=0.4)
    test_x, test_y = blobs(100, dim=16, spread=0.4, seed=1)
    result = knn_classify(train_x, train_y, test_x, test_y, 10, k=k, temperature=temperature, device=CPU, chunk=chunk)
    expected = accuracy_report(knn_reference(train_x, train_y, test_x, 10, k, temperature), test_y, 10)
    assert (result.top1, result.top5) == (expected.top1, expected.top5)
    assert 20 < result.top1 < 100  # neither trivial nor at chance: the neighbours matter
    assert result.k == min(k, 300) and result.temperature == temperature


def test_knn_rejects_bad_settings():
    x, y = blobs(20, classes=3, dim=4)
    for bad in ({"k": 0}, {"temperature": 0.0}, {"chunk": 0}):
        with pytest.raises(InputError):
            knn_classify(x, y, x, y, 3, device=CPU, **bad)


# --- balanced subsets ---------------------------------------------------------------------------------
def test_balanced_subset_keeps_each_class_share():
    counts = [50, 36, 16, 7, 1]
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    idx = balanced_subset(labels, 0.1, seed=0)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    assert (
        torch.bincount(labels[idx], minlength=5).tolist() == [max(1, round(0.1 * c)) for c in counts] == [5, 4, 2, 1, 1]
    )
    assert torch.equal(balanced_subset(labels, 0.1, seed=0), idx)
    assert not torch.equal(balanced_subset(labels, 0.1, seed=1), idx)
    assert torch.equal(balanced_subset(labels, 1.0, seed=0), torch.arange(len(labels)))
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            balanced_subset(labels, fraction, seed=0)


# --- fine-tuning --------------------------------------------------------------------------------------
def test_finetune_learns_an_easy_task_and_leaves_the_encoder_alone():
    def bright_or_dark(n, seed):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        noise = torch.randint(0, 80, (n, 3, 8, 8), generator=gen)
        return (noise + 175 * y.view(-1, 1, 1, 1)).to(torch.uint8), y  # class 0: 0..79, class 1: 175..254

    torch.manual_seed(0)
    encoder = encoder_of(small_bn_net())
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    train_images, train_y = bright_or_dark(64, 0)
    test_images, test_y = bright_or_dark(32, 1)
    result = finetune(
        encoder, train_images, train_y, test_images, test_y, 2, device=CPU, epochs=3, batch_size=16, seed=0
    )
    assert result.top1 >= 80 and result.top5 == 100.0
    assert result.train_size == 64 and result.test_size == 32 and sum(map(sum, result.confusion)) == 32
    assert all(torch.equal(v, before[k]) for k, v in encoder.backbone.state_dict().items())


# --- progress hook ----------------------------------------------------------------------------------
def test_progress_hook_sees_embedding_probe_knn_and_finetuning_to_the_end(monkeypatch):
    from crlf.engine import progress

    calls = []
    monkeypatch.setattr(progress, "hook", lambda what, done, total: calls.append((what, done, total)))
    embed(encoder_of(MeanPool()), random_images(10), batch_size=4)
    x, y = blobs(40, classes=4, dim=8)
    linear_probe(x, y, x, y, 4, device=CPU, epochs=3, batch_size=16)
    knn_classify(x, y, x, y, 4, k=5, device=CPU, chunk=16)
    finetune(encoder_of(small_bn_net()), random_images(8), torch.arange(8) % 2, random_images(4),
             torch.arange(4) % 2, 2, device=CPU, epochs=2, batch_size=4)  # fmt: skip
    by_task = {}
    for what, done, total in calls:
        by_task.setdefault(what, []).append((done, total))
    assert by_task["embedding"][:3] == [(4, 10), (8, 10), (10, 10)]
    assert by_task["linear probe epoch"] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert by_task["kNN"] == [(16, 40), (32, 40), (40, 40)]
    assert by_task["fine-tuning"] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # 2 epochs x 2 full batches
    for steps in by_task.values():  # every task ends: done reaches total, so a bar can close
        assert steps[-1][0] == steps[-1][1]
    monkeypatch.setattr(progress, "hook", None)
    assert progress.report("x", 1, 2) is False  # no hook: the engine logs now and then itself
