from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import LOSSES, cross_entropy, hinton_kd, soft_kl


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


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_invariants(method: str) -> None:
    z = torch.randn(16, 10, requires_grad=True)
    y = z.detach().argmax(1)
    kwargs = {} if method == "ce" else {"temperature": 4.0, "alpha": 1.0}
    loss = LOSSES[method](z, z.detach().clone(), y, **kwargs)
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert torch.isfinite(z.grad).all()
    if method != "ce":  # pure soft term: zero exactly when the student equals the teacher
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        other = LOSSES[method](z.detach() + torch.randn(16, 10), z.detach(), y, **kwargs)
        assert other.item() > 1e-3
