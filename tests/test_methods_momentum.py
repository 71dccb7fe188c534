"""moco, byol, simsiam: each loss against its formula written out (values, gradients, stop-gradients), the EMA and its
cosine schedule, MoCo's queue, BYOL's asymmetric views, and tiny real runs that resume bit for bit."""

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.engine import augment, methods
from crlf.engine.methods import byol, moco
from crlf.engine.methods.teacher import momentum_at
from crlf.engine.optim import build_optimizer
from crlf.engine.rundir import RunDir
from crlf.errors import Interrupted
from crlf.typed import config_of

FEAT = 8


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def build(method: str, **overrides) -> methods.Method:
    """The method around a tiny backbone (Linear + BatchNorm on 3x4x4 images), small heads, seeded."""
    cls = methods.get(method)
    values = dict(head_hidden=16, head_out=6, pred_hidden=12)
    values.update(overrides)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
    return cls(backbone, config_of(cls.Config, values), FEAT).train()


def two_views(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)]


def trained(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def assert_grads_equal(m, loss, reference):
    params = trained(m)
    for a, b in zip(grads(loss, params), grads(reference, params), strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def assert_teacher_frozen(m, teacher_modules, loss):
    """No teacher parameter trains: none takes a gradient, the optimizer leaves them out, backward gives them none."""
    teacher = [p for t in teacher_modules for p in t.parameters()]
    assert teacher and not any(p.requires_grad for p in teacher), "the teacher must take no gradient"
    opt_params = {id(p) for g in build_optimizer(m, "sgd", 0.1, 0.0).param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher}
    loss.backward()
    assert all(p.grad is None for p in teacher)
    assert all(p.grad is not None for p in m.backbone.parameters())


# --- losses against their formulas ---------------------------------------------------------------------------------
def test_moco_loss_is_symmetric_infonce_against_the_queue():
    m = build("moco", queue_size=10, temperature=0.3)
    views = two_views()
    queue = m.queue.bank.clone()
    loss = m(views)
    # the formula, by hand: positives k of the other view, negatives the other view's queue, temperature 0.3
    m.queue.bank.copy_(queue)  # the forward enqueued; the formula sees the queue from before
    x = torch.cat(views)
    q = F.normalize(m.head(m.backbone(x)), dim=1)
    k = F.normalize(m.teacher_head(m.teacher_backbone(x)), dim=1).detach()
    q1, q2, k1, k2 = *q.chunk(2), *k.chunk(2)

    def nce(q, k, negatives):
        pos = (q * k).sum(1) / 0.3
        neg = q @ negatives.T / 0.3
        return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()

    reference = (nce(q1, k2, queue[1]) + nce(q2, k1, queue[0])) / 2
    assert torch.allclose(loss, reference, atol=1e-6)
    assert_grads_equal(m, loss, reference)
    assert_teacher_frozen(m, [m.teacher_backbone, m.teacher_head], m(views))


def test_moco_v3_style_without_queue():
    m = build("moco", queue_size=0, temperature=0.2)
    assert m.queue is None and not any("queue" in k for k in m.state_dict()) and m.predictor is not None
    views = two_views()
    loss = m(views)
    x = torch.cat(views)
    q = F.normalize(m.predictor(m.head(m.backbone(x))), dim=1)
    k = F.normalize(m.teacher_head(m.teacher_backbone(x)), dim=1).detach()
    q1, q2, k1, k2 = *q.chunk(2), *k.chunk(2)

    def ctr(q, k):  # in-batch negatives, the diagonal is the positive; x 2 tau as the official code
        logits = q @ k.T / 0.2
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean() * 0.4

    reference = ctr(q1, k2) + ctr(q2, k1)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert_grads_equal(m, loss, reference)
    assert_teacher_frozen(m, [m.teacher_backbone, m.teacher_head], m(views))


def test_byol_loss_is_symmetric_regression_on_the_target():
    m = build("byol")
    views = two_views()
    loss = m(views)
    x = torch.cat(views)
    p = m.predictor(m.head(m.backbone(x)))
    t = m.target_head(m.target_backbone(x)).detach()
    p1, p2, t1, t2 = *p.chunk(2), *t.chunk(2)

    def mse(p, t):  # || p/|p| - t/|t| ||^2 = 2 - 2 cos
        return ((p / p.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()

    reference = mse(p1, t2) + mse(p2, t1)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert_grads_equal(m, loss, reference)
    assert_teacher_frozen(m, [m.target_backbone, m.target_head], m(views))


def test_simsiam_loss_stops_the_gradient_of_z():
    m = build("simsiam")
    views = two_views()
    loss = m(views)
    x = torch.cat(views)
    z = m.head(m.backbone(x))
    p = m.predictor(z)
    z1, z2, p1, p2 = *z.chunk(2), *p.chunk(2)

    def cos(a, b):
        return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()

    reference = -cos(p1, z2.detach()) / 2 - cos(p2, z1.detach()) / 2
    assert torch.allclose(loss, reference, atol=1e-6)
    assert_grads_equal(m, loss, reference)
    # the same value without the stop-gradient has other gradients: the test above sees a missing detach
    no_stop = -cos(p1, z2) / 2 - cos(p2, z1) / 2
    params = trained(m)
    differ = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(no_stop, params), grads(reference, params))
              if a is not None and b is not None]  # fmt: skip
    assert any(differ)


def test_simsiam_projector_is_three_layers_with_output_batchnorm():
    m = build("simsiam")
    linears = [mod for mod in m.head if isinstance(mod, nn.Linear)]
    assert len(linears) == 3 and isinstance(m.head[-1], nn.BatchNorm1d) and not m.head[-1].affine
    assert isinstance(m.predictor[0], nn.Linear) and m.predictor[0].out_features == 12


# --- momentum teachers -----------------------------------------------------------------------------------------------
def test_cosine_momentum_schedule():
    assert momentum_at(1, 100, 0.99) == pytest.approx(0.99)  # the first update uses the base
    assert momentum_at(51, 100, 0.99) == pytest.approx(0.995)  # halfway: (base + 1) / 2
    assert momentum_at(100, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 99 / 100) + 1) / 2)
    assert momentum_at(101, 100, 0.99) == 1.0
    values = [momentum_at(s, 100, 0.9) for s in range(1, 102)]
    assert values == sorted(values)


@pytest.mark.parametrize("name,teacher,online", [
    ("byol", ("target_backbone", "target_head"), ("backbone", "head")),
    ("moco", ("teacher_backbone", "teacher_head"), ("backbone", "head")),
])  # fmt: skip
def test_ema_update_after_each_step(name, teacher, online):
    m = build(name, momentum=0.9)
    with torch.no_grad():  # the online network moves away from the teacher (as an optimizer step would)
        for p in trained(m):
            p.add_(torch.randn_like(p))
    before = {t: {k: v.clone() for k, v in getattr(m, t).state_dict().items()} for t in teacher}
    step, total = 3, 10
    tau = momentum_at(step, total, 0.9)
    m.after_step(step, total, 1)  # one epoch: moco's and byol's schedules are per step
    for t, o in zip(teacher, online, strict=True):
        now, on = getattr(m, t).state_dict(), getattr(m, o).state_dict()
        params = {k for k, _ in getattr(m, t).named_parameters()}
        for k in now:
            if k in params:
                assert torch.allclose(now[k], tau * before[t][k] + (1 - tau) * on[k], atol=1e-6), k
            else:  # BatchNorm running statistics are the teacher's own
                assert torch.equal(now[k], before[t][k]), k


# --- MoCo's queue ----------------------------------------------------------------------------------------------------
def test_queue_takes_the_gathered_normalised_keys_and_wraps(monkeypatch):
    other_rank = lambda t: torch.cat([t, t.flip(0)])  # noqa: E731  (another process's rows, after ours)
    monkeypatch.setattr(moco.distributed, "gather", other_rank)
    m = build("moco", queue_size=10)
    views = two_views(n=3)  # 3 images per view and process: 6 keys of the global batch per view

    def keys():
        k = m.teacher_head(m.teacher_backbone(torch.cat(views))).detach()
        return torch.stack([F.normalize(other_rank(c), dim=1) for c in k.chunk(2)])  # (2, 6, D)

    start = m.queue.bank.clone()
    expected = keys()
    m(views)
    assert torch.allclose(m.queue.bank[:, :6], expected, atol=1e-6) and torch.equal(m.queue.bank[:, 6:], start[:, 6:])
    assert m.queue.ptr.tolist() == [6]
    second = keys()  # the same views, the same (not yet updated) teacher, in train mode: BN stats as the forward's
    m(views)
    assert torch.allclose(m.queue.bank[:, 6:], second[:, :4], atol=1e-6)  # positions 6..9, then around to 0, 1
    assert torch.allclose(m.queue.bank[:, :2], second[:, 4:], atol=1e-6)
    assert torch.allclose(m.queue.bank[:, 2:6], expected[:, 2:6], atol=1e-6)
    assert m.queue.ptr.tolist() == [2]
    m.eval()
    frozen = m.queue.bank.clone()
    m(views)  # evaluation forwards leave the queue alone
    assert torch.equal(m.queue.bank, frozen) and m.queue.ptr.tolist() == [2]


def test_queue_smaller_than_the_batch_keeps_the_newest_keys():
    m = build("moco", queue_size=4)
    keys = F.normalize(torch.randn(2, 6, 6), dim=-1)
    m.queue.enqueue(keys)
    # keys 2..5 are the newest; they land at positions (0 + 2 + i) % 4, the pointer moves by 6
    assert torch.equal(m.queue.bank[:, [2, 3, 0, 1]], keys[:, 2:]) and m.queue.ptr.tolist() == [2]


# --- BYOL's asymmetric augmentation ----------------------------------------------------------------------------------
def test_byol_view_augments():
    aug = augment.Augment()
    small, large = byol.view_augments(aug, 32), byol.view_augments(aug, 64)
    assert [(v.blur_p, v.solarize_p) for v in small] == [(0.0, 0.0), (0.0, 0.2)]  # no blur at CIFAR size
    assert [(v.blur_p, v.solarize_p) for v in large] == [(1.0, 0.0), (0.1, 0.2)]
    own = byol.view_augments(augment.Augment(blur_p=0.5, solarize_p=0.3), 64)
    assert [(v.blur_p, v.solarize_p) for v in own] == [(0.5, 0.3), (0.5, 0.3)]  # the user's value, both views


def test_byol_views_draw_view_one_then_view_two_from_one_generator():
    aug = augment.Augment(noise_std=0.05)
    batch = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    m = build("byol")
    v1, v2 = augment.draw(type(m).recipe(m.config, aug, 40), batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    cfg1, cfg2 = byol.view_augments(aug, 40)
    p1, p2 = augment.sample_params(5, 40, 40, cfg1, g), augment.sample_params(5, 40, 40, cfg2, g)
    assert p1.blur.all() and p1.solarize is None and p2.solarize is not None
    both = augment.apply(torch.cat([batch, batch]), augment._cat([p1, p2]), 40, g)
    assert torch.equal(v1, both[:5]) and torch.equal(v2, both[5:])
    assert v1.min() >= 0 and v1.max() <= 1 and v1.shape == (5, 3, 40, 40)


# --- real runs: learning, encoder, exact resume ----------------------------------------------------------------------
def tiny(path, method, **overrides) -> PretrainSettings:
    values = dict(method=method, data="digits", limit=32, image_size=8, batch_size=8, epochs=2, head_hidden=32,
                  head_out=16, pred_hidden=16, queue_size=40, device="cpu", out=path, cache_dir=path.parent / "cache")
    values.update(overrides)  # fmt: skip
    return PretrainSettings(**values)




def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


STATE = {"moco": ("teacher_backbone.", "queue.bank", "queue.ptr"), "byol": ("target_backbone.", "predictor."),
         "simsiam": ("predictor.",)}  # fmt: skip


@pytest.mark.parametrize("method", ["moco", "byol", "simsiam"])
def test_tiny_run_trains_and_resumes_bit_for_bit(tmp_path, method, signal_at):
    full = tiny(tmp_path / "full", method)
    summary = pretrain(full)
    assert summary["status"] == "trained" and math.isfinite(summary["final_loss"])
    encoder = load_encoder(full.out / "encoder.safetensors")
    assert encoder.epoch == 2 and encoder.image_size == 8
    with torch.no_grad():
        feats = encoder.backbone(torch.rand(2, 3, 8, 8))
    assert feats.shape == (2, 512) and torch.isfinite(feats).all()
    a = weights(full.out / "last.safetensors")
    assert all(any(k.startswith(f"model.{s}") for k in a) for s in STATE[method]), sorted(a)

    part = tiny(tmp_path / "part", method)
    with pytest.raises(Interrupted):
        pretrain(part, signal_at(epoch=2, step=2, sig=signal.SIGTERM))
    progress = RunDir(part.out).progress()
    assert (progress["epoch"], progress["step"]) == (1, 2)
    pretrain(part, resume=True)
    b = weights(part.out / "last.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "resumed run differs from the uninterrupted one"
    losses = [[m["loss"] for m in RunDir(r.out).read_metrics()] for r in (full, part)]
    assert losses[0] == losses[1]
