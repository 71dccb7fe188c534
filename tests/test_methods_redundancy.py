"""Barlow Twins and VICReg: the losses against their formulas written out element by element (values and gradients),
the global-batch convention (gathered rows, and two real gloo processes), the collapse indicator, a tiny pretrain
whose encoder loads, and exact resume after a signal mid-epoch."""

import os
import signal

import pytest
import torch
from torch import nn

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.commands.pretrain import resolve
from crlf.engine import distributed, methods
from crlf.engine.loss import barlow_loss, vicreg_loss
from crlf.engine.methods import BarlowConfig, VICRegConfig
from crlf.engine.rundir import RunDir
from crlf.errors import Interrupted
from crlf.typed import config_of

METHODS = ("barlow", "vicreg")


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


# ---- the formulas, one scalar at a time ------------------------------------------------------------------------


def barlow_by_hand(z1, z2, lambd, scale):
    """c_ij = 1/N sum_n a_ni b_nj, with a, b each column standardised by its mean and biased variance (+1e-5)."""
    n, d = z1.shape

    def standardised(z):
        cols = []
        for i in range(d):
            mean = sum(z[k, i] for k in range(n)) / n
            var = sum((z[k, i] - mean) ** 2 for k in range(n)) / n  # biased, as BatchNorm trains
            cols.append([(z[k, i] - mean) / torch.sqrt(var + 1e-5) for k in range(n)])
        return cols  # cols[i][k]

    a, b = standardised(z1), standardised(z2)
    loss = torch.zeros(())
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c**2)
    return scale * loss


def vicreg_by_hand(z1, z2, sim, std, cov):
    n, d = z1.shape
    invariance = sum((z1[k, i] - z2[k, i]) ** 2 for k in range(n) for i in range(d)) / (n * d)

    def mean(z, i):
        return sum(z[k, i] for k in range(n)) / n

    def cov_ij(z, i, j):  # unbiased, N - 1
        mi, mj = mean(z, i), mean(z, j)
        return sum((z[k, i] - mi) * (z[k, j] - mj) for k in range(n)) / (n - 1)

    def std_term(z):
        return sum(torch.relu(1 - torch.sqrt(cov_ij(z, i, i) + 1e-4)) for i in range(d)) / d

    def cov_term(z):
        return sum(cov_ij(z, i, j) ** 2 for i in range(d) for j in range(d) if i != j) / d

    variance = (std_term(z1) + std_term(z2)) / 2
    covariance = cov_term(z1) + cov_term(z2)
    return sim * invariance + std * variance + cov * covariance


def _inputs(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = 0.6 * z1 + 0.4 * torch.randn(n, d, generator=g)  # correlated views, as a method's are
    z1[:, 0] *= 0.3  # one narrow dimension: the variance hinge is active there
    z2[:, 0] *= 0.3
    return z1.requires_grad_(), z2.requires_grad_()


CASES = [
    ("barlow", lambda z1, z2: barlow_loss(z1, z2, 0.0051, 0.1), lambda z1, z2: barlow_by_hand(z1, z2, 0.0051, 0.1)),
    ("barlow-lambda", lambda z1, z2: barlow_loss(z1, z2, 0.7, 1.0), lambda z1, z2: barlow_by_hand(z1, z2, 0.7, 1.0)),
    ("vicreg", lambda z1, z2: vicreg_loss(z1, z2, 25, 25, 1), lambda z1, z2: vicreg_by_hand(z1, z2, 25, 25, 1)),
    ("vicreg-mixed", lambda z1, z2: vicreg_loss(z1, z2, 2, 3, 5), lambda z1, z2: vicreg_by_hand(z1, z2, 2, 3, 5)),
]


@pytest.mark.parametrize("name,loss_fn,by_hand", CASES, ids=[c[0] for c in CASES])
def test_loss_and_gradients_match_the_formula(name, loss_fn, by_hand):
    for seed in (0, 1):
        z1, z2 = _inputs(seed=seed)
        got, want = loss_fn(z1, z2), by_hand(z1, z2)
        assert got.dtype == torch.float32 and got.shape == ()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, got.item(), want.item())
        g_got = torch.autograd.grad(got, (z1, z2))
        g_want = torch.autograd.grad(want, (z1, z2))
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_the_terms_separately():
    """Each coefficient weighs its own term: perfect decorrelated views cost nothing, each term alone is known."""
    z = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    z = (z - z.mean(0)) / z.std(0, unbiased=False)  # standardised columns
    assert barlow_loss(z, z, 0.0, 1.0) < 1e-6  # c_ii = 1 exactly for identical views
    off = barlow_loss(z, z, 1.0, 1.0)  # the off-diagonal sum alone: small for independent columns, not zero
    assert 0 < off < 8 * 7 * 0.01
    assert torch.allclose(barlow_loss(z, z, 1.0, 0.1), 0.1 * off)
    assert vicreg_loss(z, z, 1.0, 0.0, 0.0) == 0  # invariance only
    assert vicreg_loss(z * 2, z * 2, 0.0, 1.0, 0.0) == 0  # std >= 1 everywhere: no variance penalty
    small = vicreg_loss(z * 0.5, z * 0.5, 0.0, 1.0, 0.0)  # std ~0.5 in both views: hinge ~0.5
    assert abs(small.item() - 0.5) < 0.01
    assert torch.allclose(vicreg_loss(z, z + 1, 3.0, 0.0, 0.0), torch.tensor(3.0))  # MSE 1, weight 3


def test_the_whole_batch_is_not_the_mean_of_its_halves():
    """What the gather guards against: the loss of each process's share alone is not the loss of the whole batch."""
    z1, z2 = _inputs(n=8, d=4)
    for loss in (lambda a, b: barlow_loss(a, b, 0.0051, 0.1), lambda a, b: vicreg_loss(a, b, 25, 25, 1)):
        whole = loss(z1, z2)
        halves = (loss(z1[:4], z2[:4]) + loss(z1[4:], z2[4:])) / 2
        assert not torch.allclose(whole, halves, rtol=1e-3)


# ---- the method modules ----------------------------------------------------------------------------------------


def _tiny_method(name, **overrides):
    cls = methods.get(name)
    config = config_of(cls.Config, dict(head_hidden=16, head_out=8, head_layers=3, **overrides))
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12))
    return cls(backbone, config, 12), config


def _loss_formula(name, config):
    if name == "barlow":
        return lambda a, b: barlow_loss(a, b, config.barlow_lambda, config.barlow_scale)
    return lambda a, b: vicreg_loss(a, b, config.vicreg_sim, config.vicreg_std, config.vicreg_cov)


def test_defaults_resolve_per_method():
    b = resolve(PretrainSettings(method="barlow", out="unused"))
    assert (b.head_hidden, b.head_out, b.barlow_lambda, b.barlow_scale) == (2048, 2048, 0.0051, 0.1)
    v = resolve(PretrainSettings(method="vicreg", out="unused"))
    assert (v.head_hidden, v.head_out, v.vicreg_sim, v.vicreg_std, v.vicreg_cov) == (2048, 2048, 25.0, 25.0, 1.0)
    assert resolve(PretrainSettings(method="barlow", barlow_lambda=0.01, out="unused")).barlow_lambda == 0.01
    assert BarlowConfig().head_layers == VICRegConfig().head_layers == 3
    with pytest.raises(ValueError):
        PretrainSettings(method="vicreg", vicreg_cov=float("inf"), out="unused")
    with pytest.raises(ValueError):
        PretrainSettings(method="barlow", barlow_scale=0, out="unused")


@pytest.mark.parametrize("name", METHODS)
def test_forward_gathers_each_view_over_the_global_batch(name, monkeypatch):
    """One process's half, with the other process's projections gathered after its own, gives the loss of the
    whole batch (head in eval mode so that BatchNorm treats rows independently), and the method's loss is its
    formula on the projections."""
    method, config = _tiny_method(name)
    method.eval()
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    whole = method([v1, v2])
    with torch.no_grad():
        z1, z2 = method.head(method.backbone(v1)), method.head(method.backbone(v2))
    assert torch.allclose(whole, _loss_formula(name, config)(z1, z2), rtol=1e-5)
    others = iter([z1[4:], z2[4:]])  # rank 1's rows, view by view, in the order the method gathers them
    monkeypatch.setattr(distributed, "gather", lambda z: torch.cat([z, next(others)]))
    half = method([v1[:4], v2[:4]])
    assert torch.allclose(half, whole, rtol=1e-5)
    assert next(others, None) is None  # both views were gathered


@pytest.mark.parametrize("name", METHODS)
def test_collapse_indicator(name):
    method, _ = _tiny_method(name)
    assert method.last_std is None
    g = torch.Generator().manual_seed(2)
    method([torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 3, 4, 4, generator=g)])
    spread = method.last_std
    assert isinstance(spread, torch.Tensor) and spread.shape == () and not spread.requires_grad
    assert 0.3 / 8**0.5 < spread < 1.5 / 8**0.5  # spread out: about 1/sqrt(D)
    same = torch.randn(1, 3, 4, 4, generator=g).expand(16, 3, 4, 4)  # every image the same: collapsed
    method.eval()
    method([same, same])
    assert method.last_std < 1e-3
    assert "last_std" not in "".join(method.state_dict())


# ---- real runs -------------------------------------------------------------------------------------------------


def tiny(out, name, **overrides) -> PretrainSettings:
    values = dict(
        method=name,
        data="digits",
        limit=64,
        image_size=8,
        batch_size=16,
        epochs=2,
        head_hidden=64,
        head_out=32,
        head_layers=3,
        device="cpu",
        out=out,
    )
    values.update(overrides)
    return PretrainSettings(**values)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """One uninterrupted tiny run per method."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp_:
        for key in [k for k in os.environ if k.startswith("CRLF_")]:
            mp_.delenv(key)
        for name in METHODS:
            out = tmp_path_factory.mktemp(name) / "run"
            runs[name] = (out, pretrain(tiny(out, name)))
    return runs


@pytest.mark.parametrize("name", METHODS)
def test_tiny_pretrain_runs_and_its_encoder_loads(full_runs, name):
    import json
    import math

    out, summary = full_runs[name]
    assert summary["status"] == "trained"
    losses = [m["loss"] for m in RunDir(out).read_metrics()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == name
    encoder = load_encoder(out / "encoder.safetensors")
    assert encoder.epoch == 2 and encoder.image_size == 8
    with torch.no_grad():
        feats = encoder.backbone(torch.rand(3, 3, 8, 8))
    assert feats.shape == (3, 512) and torch.isfinite(feats).all()




@pytest.mark.parametrize("name", METHODS)
def test_signal_mid_epoch_and_resume_is_exact(full_runs, tmp_path, name, signal_at):
    from safetensors.torch import load_file

    full, _ = full_runs[name]
    part = tiny(tmp_path / "part", name)
    with pytest.raises(Interrupted):
        pretrain(part, signal_at(epoch=2, step=2, sig=signal.SIGTERM))
    progress = RunDir(part.out).progress()
    assert (progress["epoch"], progress["step"]) == (1, 2)
    pretrain(part, resume=True)
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part.out / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["loss"] for m in RunDir(full).read_metrics()] == [m["loss"] for m in RunDir(part.out).read_metrics()]
