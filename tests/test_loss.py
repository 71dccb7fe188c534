"""NT-Xent against a plain loop-based reference and analytic values."""

import math

import pytest
import torch

from crlf import nt_xent


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's definition written out anchor by anchor."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    half = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + half) % n2
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (8, 16, 0.1), (17, 5, 1.0), (32, 128, 0.2)])
def test_matches_reference(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5)


@pytest.mark.parametrize("n", [2, 4, 64])
def test_identical_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 8)
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_scale_invariant_and_symmetric():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    base = nt_xent(z1, z2, 0.3)
    assert torch.allclose(nt_xent(3 * z1, 0.5 * z2, 0.3), base, atol=1e-6)
    assert torch.allclose(nt_xent(z2, z1, 0.3), base, atol=1e-6)


def test_aligned_pairs_score_lower_than_random():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(16, 32, generator=g)
    aligned = nt_xent(z1, z1 + 0.01 * torch.randn(16, 32, generator=g), 0.1)
    shuffled = nt_xent(z1, torch.randn(16, 32, generator=g), 0.1)
    assert aligned < shuffled


def test_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2, 0.5).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is not None and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), t)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3))
