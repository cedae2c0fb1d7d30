"""Distillation losses: pure functions of (student_logits, teacher, labels) and their settings.

One signature for every shape: student_logits (B, C) raw logits of a batch of rows with labels (B,) int64;
(B, L, V) of token sequences with labels (B, L), -100 at positions that are not scored (padding); and, for
`hinton_kd` and `cross_entropy`, (N, B, C) of N students trained at once with per-student settings given
as (N,) tensors (one-pass sweeps), which return (N,) losses. The teacher is raw logits of the rows'
(or tokens') shape, or a sparse cache's `SparseTargets`. Temperatures and transforms are applied here to
the raw cached logits, so one cache serves every setting; the T^2 factor lives here only. Epoch-dependent
settings (T, alpha, phi, psi, warm-up) come from `pipeline.distill.schedules`, computed by the loop and
passed in: no loss hides a schedule.

Per position (a row, or a real token), with s the student's logits, z the teacher's, T the temperature and
q = softmax(s / T), the KD term (`kl_terms`) is T^2 times

    dense      KL(softmax(z / T) || q) over all classes
    topk       sum_i p~_i (log p~_i - log q_i),  p~ = softmax(z_topk / T) renormalised over the k kept
               tokens: the common baseline, biased (the missing mass is given to the kept tokens)
    topk-tail  the KL over k + 1 buckets, the kept tokens and the tail: p_i = exp(z_i / T - lse_T), exact
               when T is one of the cache's lse_temperatures; p_tail = 1 - sum p_i, and the student's
               tail is its own mass outside the kept ids. With k = V it is the dense KL.
    sampled    mean over S tokens x drawn from softmax(z) of w(x) (log p_T(x) - log q(x)), w = p_T / p_1
               (1 at T = 1): unbiased for the dense KL's value and gradient

At a temperature the cache has no logsumexp for, lse_T is approximated from the first stored one by a
uniform tail (the V - k missing logits taken equal, which keeps their total mass exact at the stored
temperature); with distill.sparse_exact such a temperature is refused instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.distill.methods import TABLE
from pipeline.distill.targets import SPARSE_TARGETS, SparseTargets
from pipeline.distill.targets import standardize as zscore
from pipeline.errors import KDError

LossFn = Callable[..., torch.Tensor]
Teacher = torch.Tensor | SparseTargets
IGNORE = -100  # the label of a position that is not scored


def per_student(value: Any, dims: int) -> Any:
    """A per-student setting, an (N,) tensor, shaped (N, 1, ...) to broadcast over `dims` axes; a number
    as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.view(-1, *([1] * (dims - 1)))
    return value


def wide(logits: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 logits (a mixed-precision forward pass) as float32; wider ones as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def real_mean(terms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean of per-position terms (..., *labels.shape) over the scored positions: every row of a (B,)
    batch, the tokens of a (B, L) one whose label is not -100. A leading students axis stays."""
    if labels.dim() == 1:
        return terms.mean(-1)
    real = labels != IGNORE
    axes = tuple(range(-labels.dim(), 0))
    return torch.where(real, terms, 0.0).sum(axes) / real.sum().clamp(min=1)


def hard_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: Any = 0.0,
    log_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per position, CE against y_eps = (1 - eps)*onehot + eps/C: (1 - eps)*nll - eps*mean_c log p_c.
    `log_p`: log_softmax of the student's logits, when the caller has it already."""
    if log_p is None:
        log_p = F.log_softmax(wide(student_logits), dim=-1)
    index = labels.clamp(min=0).expand(log_p.shape[:-1]).unsqueeze(-1)
    nll = -log_p.gather(-1, index).squeeze(-1)
    eps = per_student(label_smoothing, nll.dim())
    if isinstance(eps, torch.Tensor) or eps:
        nll = (1.0 - eps) * nll - eps * log_p.mean(-1)
    return nll


def cross_entropy(
    student_logits: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor,
    *,
    label_smoothing: Any = 0.0,
) -> torch.Tensor:
    """Hard-label CE with optional label smoothing y_eps = (1 - eps)*onehot + eps/C, a mean over the
    scored positions; ignores the teacher."""
    if student_logits.dim() == 2 and not isinstance(label_smoothing, torch.Tensor):  # rows: the fused op
        return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return real_mean(hard_terms(student_logits, labels, label_smoothing), labels)


def kl_terms(
    student_logits: torch.Tensor,
    teacher: Teacher,
    temperature: Any,
    *,
    target: str = "topk-tail",
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per position, T^2 * KL(p_t^T || p_s^T): a dense teacher of the student's shape (or (B, C) against
    (N, B, C) students, T then (N,)), or a sparse one read as `target` (see the module's table).
    `log_q`: the student's log_softmax(s / T), when the caller has it already."""
    t = per_student(temperature, student_logits.dim())
    scale = per_student(temperature, student_logits.dim() - 1) ** 2
    if log_q is None:
        log_q = F.log_softmax(wide(student_logits) / t, dim=-1)
    if isinstance(teacher, torch.Tensor):  # dense
        log_p = F.log_softmax(wide(teacher) / t, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) * scale
    if isinstance(temperature, torch.Tensor):
        raise KDError("a sparse teacher takes one temperature (a number), not one per student")
    if target == "topk":
        log_p = F.log_softmax(teacher.values / t, dim=-1)
        return (log_p.exp() * (log_p - log_q.gather(-1, teacher.ids))).sum(-1) * scale
    if target == "topk-tail":
        log_p = teacher.values / t - teacher.lse_at(t)[..., None]
        p = log_p.exp()
        kept_q = log_q.gather(-1, teacher.ids)
        kept_kl = (p * (log_p - kept_q)).sum(-1)
        if teacher.ids.shape[-1] >= teacher.vocab:  # k = V: no tail, the dense KL
            return kept_kl * scale
        p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
        # the student's mass outside the kept ids: 1 - its kept mass (no second pass over the vocabulary;
        # clamped where the student puts all but 1e-6 of its mass on the kept tokens)
        log_q_tail = torch.log1p(-kept_q.exp().sum(-1).clamp(max=1.0 - 1e-6))
        tail = torch.xlogy(p_tail, p_tail) - p_tail * torch.where(p_tail > 0, log_q_tail, 0.0)
        return (kept_kl + tail) * scale
    if target == "sampled":
        if teacher.sampled_ids is None or teacher.sampled_logits is None:
            raise KDError("distill.sparse_target = sampled needs a cache with samples (cache.samples > 0)")
        z = teacher.sampled_logits
        log_p_t = z / t - teacher.lse_at(t)[..., None]
        log_p_1 = z - teacher.lse_at(1.0)[..., None]
        weights = (log_p_t - log_p_1).exp()
        if not (teacher.has_temperature(t) and teacher.has_temperature(1.0)):
            weights = weights / weights.mean(-1, keepdim=True)  # self-normalised
        terms = weights * (log_p_t - log_q.gather(-1, teacher.sampled_ids))
        return terms.mean(-1) * scale
    raise KDError(f"unknown sparse target '{target}': use {', '.join(SPARSE_TARGETS)}")


def soft_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: Any,
    labels: torch.Tensor | None = None,
    standardize: bool = False,
    target: str = "topk-tail",
) -> torch.Tensor:
    """T^2 * KL(p_t^T || p_s^T), a mean over the scored positions (every row when labels is None)."""
    if standardize:
        if not isinstance(teacher, torch.Tensor):
            raise KDError("logit standardization needs dense teacher logits, not a sparse cache")
        student_logits, teacher = zscore(student_logits), zscore(teacher)
    terms = kl_terms(student_logits, teacher, temperature, target=target)
    return terms.mean(-1) if labels is None else real_mean(terms, labels)


def kd_weights(alpha: Any, ce_weight: Any = None, kd_weight: Any = None) -> tuple[Any, Any]:
    """(CE weight, KD weight): the explicit pair when both are given, else (1 - alpha, alpha). Numbers
    or (N,) tensors alike."""
    if ce_weight is not None and kd_weight is not None:
        return ce_weight, kd_weight
    if alpha is None:
        raise KDError("a KD loss needs alpha, or both ce_weight and kd_weight")
    return 1.0 - alpha, alpha


def check_inputs(
    student_logits: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor,
    *,
    temperature: Any = None,
    alpha: Any = None,
    loss: str = "hinton_kd",
) -> None:
    """One-line KDErrors for what would otherwise be a raw torch error deep in a loss, or a silent NaN:
    the settings (`check_settings`), a teacher that is not logits or SparseTargets, a teacher or labels of
    another shape than the student's logits, labels that are not class indices (their range only on the
    CPU: reading device labels would wait for the device)."""
    check_settings(temperature=temperature, alpha=alpha, loss=loss)
    if teacher is not None and not isinstance(teacher, torch.Tensor | SparseTargets):
        raise KDError(
            f"{loss}: the teacher must be its logits (a tensor) or SparseTargets, as cache.targets(ids) "
            f"gives them, not a {type(teacher).__name__}"
        )
    if not isinstance(student_logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise KDError(f"{loss}: student_logits and labels must be tensors")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise KDError(f"{loss}: labels must be class indices (an integer tensor), not {labels.dtype}")
    shape = tuple(student_logits.shape)
    if student_logits.dim() < 2:
        raise KDError(
            f"{loss}: student_logits must be (batch, classes) or (batch, length, vocab), not {shape}"
        )
    if isinstance(teacher, torch.Tensor):
        theirs = tuple(teacher.shape)
        if theirs[-1:] != shape[-1:]:
            raise KDError(
                f"{loss}: the student has {shape[-1]} outputs but the teacher's logits have {theirs[-1]} "
                "classes: give the student one output per class of the cache (cache.num_classes)"
            )
        if theirs != shape[-len(theirs) :]:
            raise KDError(
                f"{loss}: teacher logits of shape {theirs} for student logits of shape {shape}: give the "
                "teacher side of the same samples (cache.targets(ids) of the batch's ids)"
            )
    elif isinstance(teacher, SparseTargets) and teacher.vocab > shape[-1]:  # more: padded output rows
        raise KDError(
            f"{loss}: the student has {shape[-1]} outputs but the cache's vocabulary is {teacher.vocab}: "
            "use a student of the teacher's tokenizer"
        )
    rows = shape[-1 - labels.dim() : -1] if labels.dim() < len(shape) else None
    if rows != tuple(labels.shape):
        raise KDError(
            f"{loss}: labels of shape {tuple(labels.shape)} for student logits of shape {shape}: give one "
            "class index a row (batch,), or a token a position (batch, length) with -100 where not scored"
        )
    if labels.device.type == "cpu" and labels.numel():  # on a device, reading them would wait for it
        low, top = (int(v) for v in torch.aminmax(labels))
        if top >= shape[-1] or low < (0 if labels.dim() == 1 else IGNORE):
            raise KDError(
                f"{loss}: labels must be class indices in 0..{shape[-1] - 1} (-100 where not scored), "
                f"not {top if top >= shape[-1] else low}"
            )


def check_settings(*, temperature: Any = None, alpha: Any = None, loss: str = "hinton_kd") -> None:
    """A temperature that is not a number > 0 or an alpha outside [0, 1] as one-line KDErrors; numbers
    and 0-d CPU tensors are checked, (N,) per-student tensors (the one-pass sweeps', checked when
    configured) and device tensors are not."""
    t, a = _scalar(temperature), _scalar(alpha)
    if temperature is not None and not isinstance(temperature, torch.Tensor | int | float):
        raise KDError(f"{loss}: temperature must be a number > 0, not {temperature!r}")
    if isinstance(t, int | float) and not (math.isfinite(t) and t > 0):
        raise KDError(f"{loss}: temperature must be a number > 0, not {t!r}")
    if isinstance(a, int | float) and not 0.0 <= a <= 1.0:
        raise KDError(f"{loss}: alpha must be in [0, 1] (the KD term's weight), not {a!r}")


def _scalar(value: Any) -> Any:
    """A setting as a Python number when it is one, or a 0-d tensor on the CPU (read without waiting
    for a device); anything else as it is (an (N,) tensor of per-student settings, a device tensor)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
        return float(value)
    return value


def hinton_kd(
    student_logits: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor,
    *,
    temperature: Any,
    alpha: Any = 0.9,
    ce_weight: Any = None,
    kd_weight: Any = None,
    label_smoothing: Any = 0.0,
    standardize: bool = False,
    target: str = "topk-tail",
) -> torch.Tensor:
    """(1 - alpha) * CE(y) + alpha * T^2 * KL(p_t^T || p_s^T)  (Hinton, Vinyals, Dean 2015), or
    ce_weight * CE(y) + kd_weight * T^2 * KL when both weights are given (they replace alpha); each a
    mean over the scored positions. Rows, token sequences (a dense or a sparse teacher, `target` its
    reading) and N students at once (student_logits (N, B, C), the settings (N,) tensors, (N,) losses)
    alike. With a KD weight of 0 (a number) the teacher is not read and may be None."""
    check_inputs(student_logits, teacher, labels, temperature=temperature, alpha=alpha)
    ce_weight, kd_weight = kd_weights(alpha, ce_weight, kd_weight)
    students = isinstance(temperature, torch.Tensor) and temperature.dim() == 1
    rows = student_logits.dim() == 2 and not students
    if rows and not isinstance(label_smoothing, torch.Tensor):  # the fused op, as cross_entropy
        log_p = None
        hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    else:
        log_p = F.log_softmax(wide(student_logits), dim=-1)
        hard = real_mean(hard_terms(student_logits, labels, label_smoothing, log_p), labels)
    if not isinstance(kd_weight, torch.Tensor) and kd_weight == 0:
        return ce_weight * hard
    if teacher is None:
        if not students:
            raise KDError("a KD loss needs the teacher's side: pass the cached logits (or alpha = 0)")
        teacher = torch.zeros_like(student_logits[0])  # every student's KD weight is 0 (cross_entropy)
    zs = student_logits
    if standardize:
        if not isinstance(teacher, torch.Tensor):
            raise KDError("logit standardization needs dense teacher logits, not a sparse cache")
        zs, teacher = zscore(zs), zscore(teacher)
    reuse = log_p is not None and not standardize and not students and temperature == 1.0
    shared = log_p if reuse else None  # log_softmax(s / T) is the hard term's at T = 1
    soft = real_mean(kl_terms(zs, teacher, temperature, target=target, log_q=shared), labels)
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
    check_inputs(student_logits, teacher_logits, labels, temperature=temperature, loss="dkd")
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
    check_inputs(student_logits, teacher_logits, labels, temperature=temperature, loss="dist")
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    ys = F.softmax(student_logits / temperature, dim=1)
    yt = F.softmax(teacher_logits / temperature, dim=1)
    inter = _pearson_distance(ys, yt)
    intra = _pearson_distance(ys.t(), yt.t())
    return ce_weight * hard + weight * temperature**2 * (beta * inter + gamma * intra)


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
    check_inputs(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, loss="skew_kl")
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
