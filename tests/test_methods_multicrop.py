"""Multi-crop augmentation, DINO and SwAV: the crops, the losses against written-out formulas, the teacher, the
centre, Sinkhorn-Knopp, frozen prototypes, and tiny real runs with an exact resume."""

import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.commands.pretrain import resolve
from crlf.engine import augment
from crlf.engine.loss import dino_loss, sinkhorn, swav_loss
from crlf.engine.methods import dino, swav
from crlf.engine.methods.teacher import momentum_at
from crlf.engine.optim import build_optimizer
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, Interrupted


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def images(n=6, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- multi-crop -------------------------------------------------------------------------------------------------
def test_multi_crop_shapes_and_counts():
    x, cfg = images(), augment.Augment()
    out = augment.multi_crop(x, cfg, gen(), local_crops=3, local_size=8)
    assert [tuple(v.shape) for v in out] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 3
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in out)
    assert len(augment.multi_crop(x, cfg, gen())) == 2  # no local crops: the pair
    assert augment.multi_crop(x, cfg, gen(), local_crops=2)[2].shape[-1] == 8  # local size: half the global one
    assert augment.multi_crop(x, cfg, gen(), global_size=12, local_crops=1)[0].shape[-1] == 12


def test_multi_crop_global_pair_is_views_and_is_deterministic():
    x, cfg = images(), augment.Augment()
    a = augment.multi_crop(x, cfg, gen(3), local_crops=2, local_size=8)
    b = augment.multi_crop(x, cfg, gen(3), local_crops=2, local_size=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # a seed reproduces every crop
    pair = augment.views(x, cfg, gen(3))
    assert torch.equal(a[0], pair[0]) and torch.equal(a[1], pair[1])  # the global pair is today's views
    c = augment.multi_crop(x, cfg, gen(4), local_crops=2, local_size=8)
    assert not any(torch.equal(u, v) for u, v in zip(a, c, strict=True))  # another seed, other crops


def test_multi_crop_crops_are_independent_and_local_ones_small():
    x = images(8, 32)
    cfg = augment.Augment(jitter_strength=0.0, grayscale_p=0.0, flip_p=0.0)  # crops alone
    out = augment.multi_crop(x, cfg, gen(), local_crops=4, local_size=8)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            if out[i].shape == out[j].shape:
                assert not torch.equal(out[i], out[j]), (i, j)
    calls = []
    real = augment.sample_params

    def spy(n, h, w, c, g):
        calls.append((n, c.crop_min_scale, c.crop_max_scale))
        return real(n, h, w, c, g)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(augment, "sample_params", spy)
        augment.multi_crop(x, cfg, gen(), local_crops=4, local_size=8)
    # the pair with the settings' scale, then every local crop in one draw with the local scale: a fixed order
    assert calls == [(16, cfg.crop_min_scale, cfg.crop_max_scale), (32, *augment.LOCAL_SCALE)]
    local = dataclasses.replace(cfg, **dict(zip(("crop_min_scale", "crop_max_scale"), augment.LOCAL_SCALE)))
    p = real(1000, 32, 32, local, gen())
    area = p.height * p.width / 32**2
    assert area.min() >= augment.LOCAL_SCALE[0] - 1e-6 and area.max() <= augment.LOCAL_SCALE[1] + 1e-6
    with pytest.raises(InputError):
        augment.multi_crop(x, cfg, gen(), local_crops=1, local_scale=(0.5, 0.1))


# --- tiny methods for the arithmetic ------------------------------------------------------------------------------
def tiny_backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_config(cls, **kw):
    """The method's config with small heads, 10 prototypes and two 8 px local crops."""
    values = dict(head_hidden=16, head_out=8, prototypes=10, local_crops=2, local_size=8)
    values.update(kw)
    return cls.Config(**values)


def normalised_views(method, seed=0):
    recipe = type(method).recipe(method.config, augment.Augment(), 16)
    return [(v - 0.5) / 0.25 for v in augment.draw(recipe, images(), gen(seed))]


# --- DINO ---------------------------------------------------------------------------------------------------------
def softmax_np(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dino_loss_value_and_gradient_match_the_formula():
    g = gen(1)
    student = [torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    teacher = [torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 7, generator=g, dtype=torch.float64)
    ts, tt = 0.1, 0.05
    loss = dino_loss(student, teacher, center, ts, tt)
    loss.backward()

    s = [v.detach().numpy() for v in student]
    t = [v.detach().numpy() for v in teacher]
    q = [softmax_np((ti - center.numpy()) / tt) for ti in t]
    pairs = [(i, j) for i in range(2) for j in range(4) if j != i]
    expected = np.mean([np.mean(-(q[i] * np.log(softmax_np(s[j] / ts))).sum(-1)) for i, j in pairs])
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for j in range(4):  # d/ds_j: sum over teachers i != j of (softmax(s_j / ts) - q_i) / (ts B), over the pairs
        grad = sum((softmax_np(s[j] / ts) - q[i]) / (ts * 5) for i in range(2) if i != j) / len(pairs)
        np.testing.assert_allclose(student[j].grad.numpy(), grad, rtol=1e-9, atol=1e-12)
    assert all(v.grad is None for v in teacher), "the teacher's targets must carry no gradient (stop-gradient)"


def test_dino_centre_is_an_ema_of_the_global_teacher_outputs_and_the_loss_uses_the_old_one():
    c = tiny_config(dino.DINO)
    m = dino.DINO(tiny_backbone(), c, 6)
    m.center.copy_(torch.randn(1, 10, generator=gen(2)))
    old = m.center.clone()
    views = normalised_views(m)
    with torch.no_grad():
        t = m.teacher_head(m.teacher_backbone(torch.cat(views[:2])))  # the two global crops only
        st = [m.head(m.backbone(v)) for v in views]
    loss = m(views)
    expected = 0.9 * old + 0.1 * t.mean(0, keepdim=True)
    torch.testing.assert_close(m.center, expected)
    ref = dino_loss(st, list(t.chunk(2)), old, c.temperature, dino.WARMUP_TEACHER_TEMPERATURE)
    torch.testing.assert_close(loss.detach(), ref)
    assert "center" in m.state_dict() and "teacher_temp" in m.state_dict()


def test_teacher_temperature_and_momentum_schedules():
    f = dino.teacher_temperature
    assert f(0.07, 0, 1000, 100) == pytest.approx(0.04)
    assert f(0.07, 150, 1000, 100) == pytest.approx(0.055)  # warm-up: 30 of 100 epochs = 300 steps
    assert f(0.07, 300, 1000, 100) == pytest.approx(0.07) and f(0.07, 999, 1000, 100) == pytest.approx(0.07)
    assert f(0.07, 150, 5000, 500) == pytest.approx(0.055)  # long runs: 30 epochs (10 steps each)
    assert f(0.07, 30, 100, 10) == pytest.approx(0.07) and f(0.07, 15, 100, 10) == pytest.approx(0.055)  # 30% of 10
    assert f(0.02, 0, 100, 10) == pytest.approx(0.02)  # a final value below 0.04: no warm-up
    mom = momentum_at  # the official cosine_scheduler(0.996, 1): after iteration i = step - 1
    assert mom(1, 100, 0.996) == pytest.approx(0.996)
    assert mom(51, 100, 0.996) == pytest.approx(0.998) and mom(101, 100, 0.996) == pytest.approx(1.0)
    m = dino.DINO(tiny_backbone(), tiny_config(dino.DINO, teacher_temperature=0.08), 6)
    assert m.teacher_temp.item() == pytest.approx(0.04)
    for step in range(1, 31):
        m.after_step(step, 100, 10)
        assert m.teacher_temp.item() == pytest.approx(f(0.08, step, 100, 10))  # the next step's temperature
    assert m.teacher_temp.item() == pytest.approx(0.08)


def test_dino_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    m = dino.DINO(tiny_backbone(), tiny_config(dino.DINO, momentum=0.9), 6)
    teacher = [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()]
    assert teacher and not any(p.requires_grad for p in teacher)
    opt = build_optimizer(m, "sgd", 0.1, 0.0)
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not ids & {id(p) for p in teacher} and len(ids) == len([p for p in m.parameters() if p.requires_grad])
    loss = m(normalised_views(m))
    loss.backward()
    assert all(p.grad is None for p in teacher)
    assert all(p.grad is not None for p in m.head.parameters())
    before = [p.clone() for p in teacher]
    opt.step()
    m.after_step(1, 10, 2)
    student = [*m.backbone.parameters(), *m.head.parameters()]
    for t0, t1, p in zip(before, teacher, student, strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * p)


def test_dino_head_last_layer_rows_have_unit_norm():
    h = dino.DINOHead(6, 16, 8, 10)
    x = torch.randn(4, 6)
    with torch.no_grad():
        h.last_layer.mul_(torch.rand(10, 1) * 5)  # the scale of v does not matter: weight norm with g = 1
        out = h(x)
    assert out.shape == (4, 10) and out.abs().max() <= 1 + 1e-6  # cosines of unit vectors


# --- SwAV ---------------------------------------------------------------------------------------------------------
def sinkhorn_np(scores, eps=0.05, iters=3):
    q = np.exp(scores / eps).T  # (K, B)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdims=True) / k
        q = q / q.sum(0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_matches_numpy_and_its_marginals():
    scores = torch.rand(12, 5, generator=gen(5), dtype=torch.float64) * 2 - 1
    q = sinkhorn(scores)
    np.testing.assert_allclose(q.numpy(), sinkhorn_np(scores.numpy()), rtol=1e-10)
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(12), rtol=1e-12)  # each sample's code sums to 1
    long = sinkhorn(scores, iterations=200)  # converged: each prototype gets B / K samples' worth
    np.testing.assert_allclose(long.sum(0).numpy(), np.full(5, 12 / 5), rtol=1e-6)
    assert q.sum(0).std() < torch.softmax(scores / 0.05, 1).sum(0).std()  # 3 iterations: already more balanced


def test_swav_loss_value_and_gradient_match_the_formula():
    g = gen(6)
    scores = [torch.rand(6, 5, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_() for _ in range(4)]
    temp = 0.1
    loss = swav_loss(scores, temp)
    loss.backward()
    p = [s.detach().numpy() for s in scores]
    q = [sinkhorn_np(p[i]) for i in range(2)]
    expected = np.mean(
        [np.mean([np.mean(-(q[i] * np.log(softmax_np(p[v] / temp))).sum(1)) for v in range(4) if v != i])
         for i in range(2)]
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    for v in range(4):  # the codes are targets without gradient: only the predictions are differentiated
        grad = sum((softmax_np(p[v] / temp) - q[i]) / (temp * 6 * 3) for i in range(2) if i != v) / 2
        np.testing.assert_allclose(scores[v].grad.numpy(), grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_swav_prototypes_are_unit_rows_and_frozen_during_the_first_epoch(optimizer):
    m = swav.SwAV(tiny_backbone(), tiny_config(swav.SwAV), 6)  # 4 steps in all: 2 epochs of 2
    opt = build_optimizer(m, optimizer, 0.1, 1e-2)
    w0 = m.prototypes.weight.detach().clone()
    torch.testing.assert_close(w0.norm(dim=1), torch.ones(10))
    for step in range(1, 5):
        loss = m(normalised_views(m, seed=step))
        opt.zero_grad()
        loss.backward()
        if step <= 2:
            assert m.prototypes.weight.grad.abs().max() == 0
        else:
            assert m.prototypes.weight.grad.abs().max() > 0
        opt.step()
        m.after_step(step, 4, 2)
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))
        assert torch.equal(m.prototypes.weight, w0) == (step <= 2), step
        assert bool(m.frozen) == (step < 2)


def test_method_defaults_fill_the_unset_options():
    d = resolve(PretrainSettings(method="dino"))
    assert (d.prototypes, d.head_out, d.temperature, d.teacher_temperature, d.momentum) == (4096, 256, 0.1, 0.07, 0.996)
    assert (d.local_crops, d.local_size) == (4, 16)
    w = resolve(PretrainSettings(method="swav", prototypes=100))
    assert (w.prototypes, w.head_out, w.temperature, w.local_crops) == (100, 128, 0.1, 4)


# --- real runs ----------------------------------------------------------------------------------------------------
def run_settings(tmp_path, method, name="run", **kw):
    values = dict(
        method=method,
        data="digits",
        limit=32,  # 2 steps per epoch
        image_size=8,
        batch_size=16,
        epochs=2,
        head_hidden=32,
        head_out=16,
        prototypes=12,
        local_crops=2,
        local_size=4,
        device="cpu",
        out=tmp_path / name,
        cache_dir=tmp_path / "cache",
    )
    values.update(kw)
    return PretrainSettings(**values)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))




@pytest.mark.parametrize("method", ["dino", "swav"])
def test_tiny_pretrain_runs_and_resumes_exactly_after_a_mid_epoch_signal(tmp_path, method, signal_at):
    full = run_settings(tmp_path, method, "full")
    summary = pretrain(full)
    losses = [m["loss"] for m in RunDir(full.out).read_metrics()]
    assert summary["status"] == "trained" and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    encoder = load_encoder(full.out / "encoder.safetensors")
    with torch.no_grad():
        feats = encoder.backbone(torch.rand(3, 3, 8, 8))
    assert feats.shape == (3, 512) and torch.isfinite(feats).all()
    state = weights(full.out / "last.safetensors")
    kept = {"dino": ("teacher_backbone.", "center"), "swav": ("prototypes.weight", "frozen")}[method]
    assert all(any(k.find(key) >= 0 for k in state) for key in kept), sorted(state)[:20]

    part = run_settings(tmp_path, method, "part")
    with pytest.raises(Interrupted):
        pretrain(part, signal_at(epoch=2, step=1, sig=signal.SIGTERM))
    assert (RunDir(part.out).progress()["epoch"], RunDir(part.out).progress()["step"]) == (1, 1)
    pretrain(part, resume=True)
    a, b = weights(full.out / "last.safetensors"), weights(part.out / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "a run stopped mid-epoch and resumed differs from the full one"
    assert losses == [m["loss"] for m in RunDir(part.out).read_metrics()]
