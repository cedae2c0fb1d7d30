from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.losses import (
    LOSSES,
    annealing,
    continuation,
    cross_entropy,
    dist,
    dkd,
    hinton_kd,
    soft_kl,
)
from pipeline.distill.methods import LABEL_ONLY
from pipeline.distill.targets import standardize


def reference_kd(
    zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, T: float, alpha: float, eps: float = 0.0
):
    """Hinton KD written out by hand, row by row, in float64."""
    zs, zt = zs.double(), zt.double()
    B, C = zs.shape
    total_kl, total_ce = 0.0, 0.0
    for i in range(B):
        ps = [math.exp(v / T) for v in zs[i].tolist()]
        pt = [math.exp(v / T) for v in zt[i].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total_kl += sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in range(C))
        p1 = [math.exp(v) for v in zs[i].tolist()]
        logp = [math.log(p / sum(p1)) for p in p1]
        target = [eps / C + (1 - eps) * (j == int(y[i])) for j in range(C)]
        total_ce += -sum(target[j] * logp[j] for j in range(C))
    return (1 - alpha) * total_ce / B + alpha * T**2 * total_kl / B


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_hinton_kd_matches_hand_written_reference(T: float, alpha: float) -> None:
    zs, zt = torch.randn(6, 5) * 3, torch.randn(6, 5) * 5
    y = torch.randint(0, 5, (6,))
    got = hinton_kd(zs, zt, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(reference_kd(zs, zt, y, T, alpha), rel=1e-5, abs=1e-6)


def test_explicit_ce_and_kd_weights_replace_alpha() -> None:
    """Logit standardization's recipe: 0.1 * CE + 9 * T^2 * KL, which no alpha in [0, 1] can express."""
    zs, zt, y = torch.randn(6, 5) * 3, torch.randn(6, 5) * 5, torch.randint(0, 5, (6,))
    got = hinton_kd(zs, zt, y, temperature=2.0, alpha=0.5, ce_weight=0.1, kd_weight=9.0)
    expected = 0.1 * reference_kd(zs, zt, y, 2.0, 0.0) + 9.0 * reference_kd(zs, zt, y, 2.0, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    stacked = hinton_kd(
        torch.stack([zs, zs]),
        zt,
        y,
        temperature=torch.tensor([2.0, 2.0]),
        label_smoothing=torch.zeros(2),
        ce_weight=torch.tensor([0.1, 0.5]),
        kd_weight=torch.tensor([9.0, 0.5]),
    )
    assert stacked.tolist() == pytest.approx(
        [expected, hinton_kd(zs, zt, y, temperature=2.0, alpha=0.5).item()]
    )


def test_label_smoothing_applies_to_hard_term_only() -> None:
    zs, zt, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    got = hinton_kd(zs, zt, y, temperature=3.0, alpha=0.3, label_smoothing=0.2)
    assert got.item() == pytest.approx(reference_kd(zs, zt, y, 3.0, 0.3, eps=0.2), rel=1e-5)
    assert cross_entropy(zs, None, y, label_smoothing=0.2).item() == pytest.approx(
        reference_kd(zs, zt, y, 1.0, 0.0, eps=0.2), rel=1e-5
    )


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_soft_term_gradient_has_t_squared_scaling(T: float) -> None:
    """d/dz_s [T^2 KL(p_t^T || p_s^T)] = T (p_s^T - p_t^T) / B: the T^2 factor keeps the scale ~T, not 1/T."""
    zs = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 7, dtype=torch.float64)
    soft_kl(zs, zt, temperature=T).backward()
    expected = T * (torch.softmax(zs.detach() / T, 1) - torch.softmax(zt / T, 1)) / 5
    assert torch.allclose(zs.grad, expected, atol=1e-12)


# settings under which each loss is a pure teacher-matching term (no hard-label part)
PURE_SOFT = {
    "kd": {"temperature": 4.0, "alpha": 1.0},
    "annealing": {"phi": 1.0},
    "continuation": {"phi": 1.0, "psi": 0.0},
    "dkd": {"temperature": 4.0, "ce_weight": 0.0},
    "dist": {"temperature": 4.0, "ce_weight": 0.0},
    "skew-kl": {"temperature": 4.0, "alpha": 1.0},
    "skew-rkl": {"temperature": 4.0, "alpha": 1.0},
}


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_invariants(method: str) -> None:
    z = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    y = z.detach().argmax(1)
    kwargs = PURE_SOFT.get(method, {})
    loss = LOSSES[method](z, z.detach().clone(), y, **kwargs)
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert torch.isfinite(z.grad).all()
    if method in PURE_SOFT:  # minimal (zero) exactly when the student equals the teacher
        # DIST's eps = 1e-8 in the Pearson denominator (as published) leaves ~1e-4 at equality
        assert loss.item() == pytest.approx(0.0, abs=1e-3 if method == "dist" else 1e-9)
        other = LOSSES[method](z.detach() + torch.randn_like(z), z.detach(), y, **kwargs)
        assert other.item() > 1e-3


def test_pure_soft_covers_every_distillation_method() -> None:
    assert set(PURE_SOFT) == set(LOSSES) - LABEL_ONLY


@pytest.mark.parametrize("mse", ["sum", "mean"])
def test_annealing_matches_mse_reference(mse: str) -> None:
    zs, zt = torch.randn(8, 10), torch.randn(8, 10) * 4
    got = annealing(zs, zt, None, phi=0.3, mse=mse)
    reference = F.mse_loss(zs, 0.3 * zt)  # the authors' code: mean over classes and batch
    assert got.item() == pytest.approx(reference.item() * (10 if mse == "sum" else 1), rel=1e-5)


def test_continuation_matches_hand_written_formula() -> None:
    zs, zt, y = torch.randn(6, 4), torch.randn(6, 4) * 3, torch.randint(0, 4, (6,))
    phi, psi, margin = 0.6, 0.25, 5.0
    per_sample = [
        max(
            0.0,
            sum((a - phi * b) ** 2 for a, b in zip(zs[i].tolist(), zt[i].tolist(), strict=True))
            - margin * phi,
        )
        for i in range(6)
    ]
    assert 0.0 in per_sample and max(per_sample) > 0  # the margin clips some samples, not all
    reference = psi * F.cross_entropy(zs, y).item() + (1 - psi) * sum(per_sample) / 6
    got = continuation(zs, zt, y, phi=phi, psi=psi, margin=margin)
    assert got.item() == pytest.approx(reference, rel=1e-5)


def reference_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Zhao et al.'s dkd_loss (mdistiller distillers/DKD.py), written out as published."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_authors_reference(T: float) -> None:
    zs, zt = torch.randn(12, 10, dtype=torch.float64) * 2, torch.randn(12, 10, dtype=torch.float64) * 4
    y = torch.randint(0, 10, (12,))
    ce = F.cross_entropy(zs, y)
    for alpha, beta, warmup in [(1.0, 8.0, 1.0), (0.5, 2.0, 0.25)]:
        expected = 0.7 * ce + warmup * reference_dkd(zs, zt, y, alpha, beta, T)
        got = dkd(zs, zt, y, temperature=T, alpha=alpha, beta=beta, ce_weight=0.7, warmup=warmup)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_dist_matches_numpy_pearson() -> None:
    zs, zt = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (16,))
    T = 4.0
    ys, yt = torch.softmax(zs / T, 1).numpy(), torch.softmax(zt / T, 1).numpy()
    inter = np.mean([1 - np.corrcoef(ys[i], yt[i])[0, 1] for i in range(16)])
    intra = np.mean([1 - np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(5)])
    expected = F.cross_entropy(zs, y).item() + 2.0 * T**2 * (1.0 * inter + 0.5 * intra)
    got = dist(zs, zt, y, temperature=T, beta=1.0, gamma=0.5, weight=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_standardization() -> None:
    z = torch.randn(4, 10) * 5 + 3
    s = standardize(z)
    assert torch.allclose(s.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s.std(1), torch.ones(4), atol=1e-5)
    zs, zt, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    # the soft term only sees z-scores: invariant to the teacher's scale and shift; CE stays on raw logits
    a = hinton_kd(zs, zt, y, temperature=2.0, alpha=0.5, standardize=True)
    b = hinton_kd(zs, 7 * zt - 2, y, temperature=2.0, alpha=0.5, standardize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    manual = 0.5 * F.cross_entropy(zs, y) + 0.5 * soft_kl(standardize(zs), standardize(zt), temperature=2.0)
    assert a.item() == pytest.approx(manual.item(), rel=1e-6)
    d1 = dkd(zs, zt, y, temperature=2.0, standardize=True)
    d2 = dkd(zs, 3 * zt + 1, y, temperature=2.0, standardize=True)
    assert d1.item() == pytest.approx(d2.item(), rel=1e-5)
