"""Every method's loss as a pure function of embeddings (no modules, no state): what a user's own loop can call.

The conventions of each (which mean, which scale, which variance) follow the official code; the method modules'
docstrings say where implementations differ. Inputs are the projections of the whole (global) batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # torch.nn.BatchNorm1d's, as in Barlow Twins' affine-free bn
VAR_EPS = 1e-4  # VICReg's, inside the square root of the variance
SWAV_EPSILON = 0.05  # SwAV's official --epsilon
SINKHORN_ITERATIONS = 3  # SwAV's official --sinkhorn_iterations


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross entropy over 2N views: each view's positive is the other view of its image,
    every other view in the batch is a negative. z1, z2: (N, D), not yet normalised. Returns the mean over 2N anchors.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D); float32 even under autocast
    logits = z @ z.T / temperature  # (2N, 2N) cosine similarities / tau
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    targets = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(logits, targets)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: normalised queries q (N, D), their positive keys k (N, D), negatives `queue` (K, D)."""
    pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    neg = q @ queue.T  # (N, K)
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def in_batch_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss of one direction: q_i against every key, k_i the positive; scaled by 2 tau as the official
    code does."""
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * (2 * temperature)


def regression_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE: mean over rows of 2 - 2 cos(p, t)."""
    return (2 - 2 * F.cosine_similarity(p, t, dim=1)).mean()


def queue_kl(p: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """lightly-train's distillation v1: KL(softmax(t Q^T / tau) || softmax(p Q^T / tau)) per row (batch mean), with
    the student's p, the teacher's t and the queue Q of past teacher features L2-normalised: the queue acts as a
    pseudo classifier whose soft labels the student learns."""
    target = F.softmax(t @ queue.T / temperature, dim=1)
    return F.kl_div(F.log_softmax(p @ queue.T / temperature, dim=1), target, reduction="batchmean")


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean_i cos(p_i, z_i), with z detached (the stop-gradient)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Each column to zero mean and unit (biased) variance along the batch, as BatchNorm1d(affine=False) trains."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale: float = 1.0) -> torch.Tensor:
    """Barlow Twins loss of the projections z1, z2 (N, D) of the two views (the whole batch), in float32."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    c = standardise(z1.float()).T @ standardise(z2.float()) / n  # (D, D) cross-correlation
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


def spread(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: mean over dimensions of the batch std of the L2-normalised projections (detached)."""
    with torch.no_grad():
        return torch.cat([F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)]).std(dim=0).mean()


def std_loss(z: torch.Tensor) -> torch.Tensor:
    """Hinge on the std of each dimension along the batch: mean_d relu(1 - sqrt(var_d + eps)), var unbiased."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + VAR_EPS)).mean()


def cov_loss(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal entries of the unbiased (N - 1) covariance matrix, divided by D."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """VICReg loss of the projections z1, z2 (N, D) of the two views (the whole batch, N >= 2), in float32."""
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must both be (N, D) with N >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance = (std_loss(z1) + std_loss(z2)) / 2
    covariance = cov_loss(z1) + cov_loss(z2)
    return sim * invariance + std * variance + cov * covariance


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_temp: float,
    teacher_temp: float | torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Mean over the pairs (teacher crop i, student crop j != i) of the batch-mean cross-entropy
    H(softmax((t_i - c) / teacher_temp), softmax(s_j / student_temp)); the teacher side carries no gradient."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    logs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(q * logs[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(len(logs)) if j != i]
    return torch.stack(terms).mean()


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor, epsilon: float = SWAV_EPSILON, iterations: int = SINKHORN_ITERATIONS
) -> torch.Tensor:
    """Codes (B, K) of scores (B, K): exp(scores / epsilon) scaled alternately so that each prototype gets 1 / K of
    the mass and each sample 1 / B, then rows multiplied by B (each sample's code sums to 1)."""
    q = torch.exp((scores - scores.max()) / epsilon).t()  # (K, B), as the official code
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swav_loss(scores: list[torch.Tensor], temperature: float, assign: int = 2) -> torch.Tensor:
    """The swapped prediction loss of the per-crop prototype scores (crop, B, K): codes of the first `assign` crops,
    predicted by every other crop."""
    total = scores[0].new_zeros(())
    for i in range(assign):
        q = sinkhorn(scores[i].detach())
        others = [v for v in range(len(scores)) if v != i]
        terms = [-(q * F.log_softmax(scores[v] / temperature, dim=1)).sum(1).mean() for v in others]
        total = total + torch.stack(terms).mean()
    return total / assign


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MAE's loss (official ``forward_loss`` with ``norm_pix_loss``): the squared error of each predicted patch
    against its target patch normalised by the patch's own mean and (unbiased) variance, eps 1e-6, averaged over
    the patch's values and over each image's masked patches. pred, target: (N, L, P) patches, mask: (N, L) bool,
    True where masked. Returns the mean over the N images, or the (N,) per-image losses with reduction="none"
    (every image masks the same number of patches, so the mean over images is the official mean over patches)."""
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be (N, L, P) and the mask "
                         f"(N, L), got {tuple(mask.shape)}")  # fmt: skip
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    per_patch = ((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(dim=-1)  # (N, L)
    m = mask.to(per_patch.dtype)
    per_image = (per_patch * m).sum(1) / m.sum(1).clamp_min(1)
    return per_image if reduction == "none" else per_image.mean()


def masked_patch_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], masks: list[torch.Tensor], center: torch.Tensor,
    student_temp: float, teacher_temp: float | torch.Tensor, reduction: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """iBOT's masked-patch loss (official ``iBOTLoss``, its ``loss2``): per global crop v, the cross-entropy
    H(softmax((t_v - c) / teacher_temp), softmax(s_v / student_temp)) of each patch, averaged over each image's
    masked patches (a count of at least 1), then over the crops. student, teacher: (N, L, K) per crop, masks: (N, L)
    per crop, True (or 1) where the student's patch was masked; the teacher side carries no gradient. Returns the
    mean over the N images, or the (N,) per-image losses with reduction="none"."""
    per_crop = []
    for s, t, m in zip(student, teacher, masks, strict=True):
        q = F.softmax((t.detach() - center) / teacher_temp, dim=-1)
        ce = -(q * F.log_softmax(s / student_temp, dim=-1)).sum(-1)  # (N, L)
        m = m.to(ce.dtype)
        per_crop.append((ce * m).sum(1) / m.sum(1).clamp_min(1))
    per_image = torch.stack(per_crop).mean(0)
    return per_image if reduction == "none" else per_image.mean()
