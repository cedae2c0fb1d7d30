"""Distillation losses: pure functions of (student_logits, teacher_logits, labels) and their settings.

Shapes: student_logits, teacher_logits (B, C) raw logits; labels (B,) int64. Temperatures are applied
here to the raw cached logits, so a cache serves every temperature. The T^2 factor lives here only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)  # (B,)
    return kl.mean() * temperature**2


def hinton_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1 - alpha) * CE(y) + alpha * T^2 * KL(p_t^T || p_s^T)  (Hinton, Vinyals, Dean 2015)."""
    hard = cross_entropy(student_logits, None, labels, label_smoothing=label_smoothing)
    return (1.0 - alpha) * hard + alpha * soft_kl(student_logits, teacher_logits, temperature=temperature)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "kd": hinton_kd}
# Methods that train from labels alone: they run without a logit cache.
LABEL_ONLY = frozenset({"ce"})
