"""Distillation losses: pure functions of (student_logits, teacher_logits, labels) and their settings.

Shapes: student_logits, teacher_logits (B, C) raw logits; labels (B,) int64. Temperatures and transforms
are applied here to the raw cached logits, so one cache serves every setting. The T^2 factor lives here
only. Epoch-dependent settings (T, alpha, phi, psi, warm-up) come from `pipeline.schedules`, computed by
the loop and passed in: no loss hides a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.methods import TABLE
from pipeline.targets import standardize as zscore

LossFn = Callable[..., torch.Tensor]


def cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hard-label CE with optional label smoothing y_eps = (1 - eps)*onehot + eps/C; ignores the teacher."""
    return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch."""
    if standardize:
        student_logits, teacher_logits = zscore(student_logits), zscore(teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)  # (B, C)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    # batchmean = sum over classes, mean over rows, in one op (this runs every batch: fewer ops, less time)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kd_weights(alpha: Any, ce_weight: Any = None, kd_weight: Any = None) -> tuple[Any, Any]:
    """(CE weight, KD weight): the explicit pair when both are given, else (1 - alpha, alpha). Numbers
    or (N,) tensors alike."""
    if ce_weight is not None and kd_weight is not None:
        return ce_weight, kd_weight
    assert alpha is not None, "kd needs alpha or both weights"
    return 1.0 - alpha, alpha


def hinton_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 0.9,
    ce_weight: float | None = None,
    kd_weight: float | None = None,
    label_smoothing: float = 0.0,
    standardize: bool = False,
) -> torch.Tensor:
    """(1 - alpha) * CE(y) + alpha * T^2 * KL(p_t^T || p_s^T)  (Hinton, Vinyals, Dean 2015), or
    ce_weight * CE(y) + kd_weight * T^2 * KL when both weights are given (they replace alpha)."""
    ce_weight, kd_weight = kd_weights(alpha, ce_weight, kd_weight)
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    soft = soft_kl(student_logits, teacher_logits, temperature=temperature, standardize=standardize)
    return ce_weight * hard + kd_weight * soft


def squared_distance(
    student_logits: torch.Tensor, target_logits: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Per-sample ||z_s - target||^2 (B,): summed over classes ("sum", the papers' norm) or averaged ("mean",
    the authors' F.mse_loss)."""
    sq = (student_logits - target_logits).pow(2)
    return sq.sum(1) if reduction == "sum" else sq.mean(1)


def annealing(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    phi: float,
    mse: str = "sum",
) -> torch.Tensor:
    """Annealing-KD phase 1 (Jafari et al., EACL 2021): mean over the batch of ||z_s - phi(T)*z_t||^2.
    No softmax and no temperature on the student; phase 2 is plain `cross_entropy`."""
    return squared_distance(student_logits, phi * teacher_logits, mse).mean()


def continuation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    phi: float,
    psi: float,
    margin: float = 0.0,
    mse: str = "sum",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Continuation-KD (Jafari et al., EMNLP Findings 2022):
    psi * CE + (1 - psi) * mean_b max(0, ||z_s - phi(T)*z_t||^2 - m*phi(T))."""
    hinge = (squared_distance(student_logits, phi * teacher_logits, mse) - margin * phi).clamp_min(0).mean()
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    return psi * hard + (1.0 - psi) * hinge


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
    ce_weight: float = 1.0,
    warmup: float = 1.0,
    label_smoothing: float = 0.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ce_weight*CE + warmup * T^2 * (alpha*TCKD + beta*NCKD).
    TCKD: KL of the binary [p_target, 1 - p_target]; NCKD: KL of the softmax over non-target classes."""
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    zs, zt = (
        (zscore(student_logits), zscore(teacher_logits)) if standardize else (student_logits, teacher_logits)
    )
    zs, zt = zs / temperature, zt / temperature
    target = F.one_hot(labels, zs.shape[1]).bool()  # (B, C)

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:  # (B, 2): log p_target, log(1 - p_target)
        total = torch.logsumexp(z, dim=1)
        on = z[target]
        off = torch.logsumexp(z.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([on - total, off - total], dim=1)

    tckd = F.kl_div(binary_log_probs(zs), binary_log_probs(zt), reduction="batchmean", log_target=True)
    # the target class pushed out of the softmax, as in the authors' code (-1000 on the scaled logits)
    nckd = F.kl_div(
        F.log_softmax(zs - 1000.0 * target, dim=1),
        F.log_softmax(zt - 1000.0 * target, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return ce_weight * hard + warmup * temperature**2 * (alpha * tckd + beta * nckd)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - Pearson correlation between matching rows of a and b, averaged over rows."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1.0 - corr.mean()


def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    beta: float = 1.0,
    gamma: float = 1.0,
    weight: float = 2.0,
    ce_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ce_weight*CE + weight * T^2 * (beta*inter + gamma*intra), where
    inter compares each sample's class distribution and intra each class's column across the batch."""
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    ys = F.softmax(student_logits / temperature, dim=1)
    yt = F.softmax(teacher_logits / temperature, dim=1)
    inter = _pearson_distance(ys, yt)
    intra = _pearson_distance(ys.t(), yt.t())
    return ce_weight * hard + weight * temperature**2 * (beta * inter + gamma * intra)


def hinton_kd_stacked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: torch.Tensor,
    label_smoothing: torch.Tensor,
    alpha: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    kd_weight: torch.Tensor | None = None,
    standardize: bool = False,
) -> torch.Tensor:
    """`hinton_kd` for N students at once, in the ops of one: student_logits (N, B, C); temperature,
    label_smoothing and alpha, or ce_weight and kd_weight, (N,); returns (N,) losses, loss i equal to
    hinton_kd (or cross_entropy when its KD weight is 0) of slice i up to rounding. Used by one-pass
    sweeps, where a loss per student would cost N times the per-batch Python overhead."""
    n, b, _ = student_logits.shape
    zs = student_logits
    zt = (
        torch.zeros_like(zs[0]) if teacher_logits is None else teacher_logits
    )  # (B, C); unused when alpha = 0
    if standardize:
        zs, zt = zscore(zs.flatten(0, 1)).view_as(zs), zscore(zt)
    t = temperature.view(n, 1, 1)
    log_p_s = F.log_softmax(zs / t, dim=-1)  # (N, B, C)
    log_p_t = F.log_softmax(zt.unsqueeze(0) / t, dim=-1)
    soft = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean(-1) * temperature**2  # (N,)
    log_p = F.log_softmax(student_logits, dim=-1)  # the hard term sees raw logits
    nll = -log_p.gather(-1, labels.expand(n, b).unsqueeze(-1)).squeeze(-1).mean(-1)
    uniform = -log_p.mean(-1).mean(-1)  # CE against the uniform distribution: the smoothing part
    hard = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    ce_weight, kd_weight = kd_weights(alpha, ce_weight, kd_weight)
    return ce_weight * hard + kd_weight * soft


def _real_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (B, C) as they are; token sequences (B, L, V) as one row per real token (labels != -100)."""
    if student_logits.dim() == 2:
        return student_logits, teacher_logits, labels
    real = labels != -100
    return student_logits[real], teacher_logits[real], labels[real]


def skew_divergence(
    first: torch.Tensor, second: torch.Tensor, skew: float, temperature: float
) -> torch.Tensor:
    """Per row, KL(P || s*P + (1 - s)*Q) of P = softmax(first / T), Q = softmax(second / T) (DistiLLM's
    skewed KL; s = 0 is KL(P || Q))."""
    log_p = F.log_softmax(first / temperature, dim=-1)
    log_q = F.log_softmax(second / temperature, dim=-1)
    log_m = log_q if skew == 0 else torch.logaddexp(log_p + math.log(skew), log_q + math.log(1.0 - skew))
    return (log_p.exp() * (log_p - log_m)).sum(-1).clamp(min=0.0)  # >= 0: rounding at P = Q aside


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 0.9,
    ce_weight: float | None = None,
    kd_weight: float | None = None,
    label_smoothing: float = 0.0,
    skew: float = 0.1,
    reverse: bool = False,
) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * SKL, SKL = KL(p || s*p + (1-s)*q) with p the teacher's and q the
    student's softmax at T (DistiLLM, Ko et al., ICML 2024); `reverse`: SRKL = KL(q || s*q + (1-s)*p).
    Rows (B, C), or token sequences (B, L, V) with labels -100 at padding (a mean over real tokens)."""
    zs, zt, y = _real_rows(student_logits, teacher_logits, labels)
    ce_weight, kd_weight = kd_weights(alpha, ce_weight, kd_weight)
    hard = F.cross_entropy(zs, y, label_smoothing=label_smoothing)
    first, second = (zs, zt) if reverse else (zt, zs)
    soft = skew_divergence(first, second, skew, temperature).mean() * temperature**2
    return ce_weight * hard + kd_weight * soft


def skew_rkl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """`skew_kl` with reverse=True: KL(q || s*q + (1 - s)*p), the student's side mixed in."""
    return skew_kl(student_logits, teacher_logits, labels, reverse=True, **kwargs)


LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "kd": hinton_kd,
    "annealing": annealing,
    "continuation": continuation,
    "dkd": dkd,
    "dist": dist,
    "skew-kl": skew_kl,
    "skew-rkl": skew_rkl,
}
assert {m.loss_name for m in TABLE.values()} <= set(LOSSES), "every method's loss is in LOSSES"
