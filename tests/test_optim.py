"""crlf.engine.optim as small pure pieces: the warm-up / cosine schedule, the plateau rule and LARS' trust ratio."""

import math

import pytest
import torch

from crlf.engine.optim import LARS, Plateau, build_optimizer, lr_at

# --- lr_at: linear warm-up, then cosine decay to 0 (or flat) -------------------------------------------------------


def test_warmup_rises_linearly_to_the_peak():
    lrs = [lr_at(step, 100, 4, 0.8, "cosine") for step in range(4)]
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [lr_at(step, 100, 4, 0.8, "none") for step in range(4)] == pytest.approx(lrs)  # both schedules warm up


def test_cosine_decays_from_the_peak_to_zero_after_the_warmup():
    total, warmup, peak = 110, 10, 2.0
    assert lr_at(warmup, total, warmup, peak, "cosine") == pytest.approx(peak)  # the first step after the warm-up
    assert lr_at(warmup + 50, total, warmup, peak, "cosine") == pytest.approx(peak / 2)  # half way: half the peak
    quarter = peak * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(warmup + 25, total, warmup, peak, "cosine") == pytest.approx(quarter)
    assert lr_at(total - 1, total, warmup, peak, "cosine") == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_at(total, total, warmup, peak, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 7, total, warmup, peak, "cosine") == pytest.approx(0.0, abs=1e-12)  # never below 0
    after = [lr_at(step, total, warmup, peak, "cosine") for step in range(warmup, total)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing


def test_no_warmup_starts_at_the_peak_and_none_stays_flat():
    assert lr_at(0, 50, 0, 0.3, "cosine") == pytest.approx(0.3)
    assert lr_at(25, 50, 0, 0.3, "cosine") == pytest.approx(0.15)
    assert {lr_at(step, 50, 5, 0.3, "none") for step in range(5, 60)} == {0.3}
    assert {lr_at(step, 50, 5, 0.3, "plateau") for step in range(5, 60)} == {0.3}  # the plateau rule scales it


def test_warmup_as_long_as_the_run():
    assert [lr_at(step, 4, 4, 1.0, "cosine") for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


# --- Plateau: halve after `patience` epochs without a relative improvement of `threshold` --------------------------


def test_plateau_halves_after_patience_stalled_epochs():
    p = Plateau(patience=2)
    assert [p.update(x) for x in (1.0, 0.9, 0.95, 0.95)] == [1.0, 1.0, 1.0, 1.0]  # two stalled epochs: not yet
    assert p.update(0.95) == 0.5  # the third: halved, and the count starts over
    assert p.bad_epochs == 0 and p.best == 0.9
    assert [p.update(0.91) for _ in range(2)] == [0.5, 0.5]
    assert p.update(0.91) == 0.25


def test_plateau_improvement_resets_the_count_and_must_be_relative():
    p = Plateau(patience=1, threshold=0.01)
    p.update(1.0)
    assert p.update(0.995) == 1.0 and p.bad_epochs == 1  # 0.5% better is not 1% better
    assert p.update(0.98) == 1.0 and p.bad_epochs == 0 and p.best == 0.98  # 2% better: a new best
    assert p.update(0.975) == 1.0 and p.update(0.975) == 0.5


def test_plateau_defaults_and_state_round_trip():
    p = Plateau()
    assert (p.factor, p.patience, p.threshold) == (0.5, 5, 1e-4)
    assert [p.update(1.0) for _ in range(6)] == [1.0] * 6  # the first sets the best, five stalled epochs are patience
    assert p.update(1.0) == 0.5
    q = Plateau(**p.state())  # what a checkpoint saves as JSON
    for loss in (0.99, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2):
        assert q.update(loss) == p.update(loss)
    assert q.state() == p.state() and q.scale == 0.25


# --- LARS: SGD with momentum whose step per weight matrix is scaled by trust * ||w|| / ||grad + wd w|| -------------


def _lars_reference(w, grads, lr, momentum, wd, trust):
    """Plain-Python LARS on one weight matrix (a list of floats), step by step."""
    w, buf = list(w), None
    for g in grads:
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        wn, dn = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in d))
        ratio = trust * wn / dn if wn > 0 and dn > 0 else 1.0
        d = [x * ratio for x in d]
        buf = d if buf is None else [momentum * b + x for b, x in zip(buf, d)]
        w = [wi - lr * b for wi, b in zip(w, buf)]
    return w


def _run_lars(w0, grads, **kwargs):
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = LARS([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach()


def test_lars_scales_weight_matrices_by_the_trust_ratio():
    w0 = [[3.0, 4.0], [0.0, 0.0]]  # ||w|| = 5
    grads = [[[0.5, -1.0], [0.0, 0.0]], [[1.0, 1.0], [-1.0, 0.5]], [[0.0, 2.0], [0.1, 0.1]]]
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust=0.02)
    got = _run_lars(w0, grads, **kwargs)
    flat = [[x for row in g for x in row] for g in grads]
    expected = _lars_reference([3.0, 4.0, 0.0, 0.0], flat, lr=0.5, momentum=0.9, wd=0.1, trust=0.02)
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    # the first step by hand: g + wd w = (0.8, -0.6, 0, 0), of norm 1, so the ratio is 0.02 * ||w|| / 1 = 0.1
    one = _run_lars(w0, grads[:1], **kwargs)
    assert one.flatten().tolist() == pytest.approx([3.0 - 0.5 * 0.1 * 0.8, 4.0 + 0.5 * 0.1 * 0.6, 0.0, 0.0])
    plain_sgd = [3.0 - 0.5 * 0.8, 4.0 + 0.5 * 0.6]
    assert one[0].tolist() != pytest.approx(plain_sgd)  # the ratio is not 1


def test_lars_leaves_1d_parameters_unadapted_and_undecayed_and_zero_weights_at_ratio_1():
    bias = _run_lars([1.0, -2.0], [[0.5, 0.5], [1.0, 0.0]], lr=0.1, momentum=0.5, weight_decay=0.3, trust=0.001)
    # plain momentum SGD: buf1 = g1, w1 = w0 - 0.1 g1; buf2 = 0.5 g1 + g2, w2 = w1 - 0.1 buf2
    assert bias.tolist() == pytest.approx([1.0 - 0.05 - 0.1 * 1.25, -2.0 - 0.05 - 0.1 * 0.25])
    zero = _run_lars([[0.0, 0.0]], [[[1.0, 2.0]]], lr=0.1, momentum=0.9, weight_decay=0.0, trust=0.001)
    assert zero.flatten().tolist() == pytest.approx([-0.1, -0.2])  # ||w|| = 0: the ratio falls back to 1
    still = _run_lars([[1.0, 2.0]], [[[0.0, 0.0]]], lr=0.1, momentum=0.9, weight_decay=0.0, trust=0.001)
    assert still.flatten().tolist() == [1.0, 2.0]  # no gradient: no step (and no division by zero)


def test_build_optimizer_decays_only_weight_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for name, kind in (("sgd", torch.optim.SGD), ("lars", LARS), ("adam", torch.optim.Adam)):
        opt = build_optimizer(model, name, 0.1, 0.01)
        decay, no_decay = opt.param_groups
        assert isinstance(opt, kind) and decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
        assert [p.ndim for p in decay["params"]] == [2, 2] and [p.ndim for p in no_decay["params"]] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "rmsprop", 0.1, 0.0)
