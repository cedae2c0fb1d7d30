"""Schedules: pure functions of the (0-based) epoch, called explicitly in the loop.

T = temperature_at(epoch, cfg)        alpha = alpha_at(epoch, cfg)
T = step_temperature(epoch, n, t_max) phi = phi(T, t_max)       psi = psi_at(epoch, ...)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the configs are only read: this module imports nothing of the package
    from pipeline.config import ContinuationConfig, DistillConfig, OptimConfig


def lr_at(epoch: int, cfg: OptimConfig) -> float:
    """Learning rate per epoch: constant; cosine or linear from cfg.lr down to 0 over cfg.epochs; or step
    (x0.1 at 50% and 75%, the papers' CIFAR schedule, int(epochs/2) and int(3*epochs/4) as in their code)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":  # Hugging Face's linear decay without warm-up, stepped per epoch
        return cfg.lr * (1.0 - epoch / cfg.epochs)
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** ((epoch >= cfg.epochs // 2) + (epoch >= (3 * cfg.epochs) // 4)))
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def interpolate(kind: str, epoch: int, epochs: int, start: float, end: float, steps: int = 4) -> float:
    """`start` at epoch 0 to `end` at the last epoch: constant (start), linear, cosine, or `steps` levels."""
    if kind == "constant" or epochs <= 1:
        return start
    progress = min(epoch / (epochs - 1), 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "step":
        if steps <= 1:
            return start
        level = min(int(epoch * steps / epochs), steps - 1)
        return start + (end - start) * level / (steps - 1)
    raise ValueError(f"unknown schedule kind {kind!r}")


def temperature_at(epoch: int, cfg: DistillConfig) -> float:
    return interpolate(
        cfg.temperature_schedule,
        epoch,
        cfg.train.epochs,
        cfg.temperature,
        cfg.temperature_end,
        cfg.temperature_steps,
    )


def alpha_at(epoch: int, cfg: DistillConfig) -> float:
    return interpolate(cfg.alpha_schedule, epoch, cfg.train.epochs, cfg.alpha, cfg.alpha_end)


def step_temperature(epoch: int, epochs: int, t_max: int) -> int:
    """Annealing-KD's and Continuation-KD's integer T: t_max at epoch 0, down by one every
    k = floor(epochs / t_max) epochs, clamped at 1 (one function for both methods).

    When epochs is not a multiple of t_max, the r = epochs mod t_max extra epochs all stay at T = 1 (so the
    last level lasts k + r epochs): the Continuation paper's rule (T <- T - 1 when i mod k = 0, clamped).
    The Annealing-KD authors' code steps the same way but without the clamp (their T counts up past
    t_max), so for those r epochs its target is z_t * (t_max + 1) / t_max or more (Phi > 1); here Phi
    stays 1. Needs epochs >= t_max (checked by the config, as the authors' code asserts)."""
    k = max(1, epochs // t_max)
    return max(1, t_max - epoch // k)


def phi(temperature: float, t_max: int) -> float:
    """phi(T) = 1 - (T - 1) / t_max: the fraction of the teacher's logits the student is asked to match."""
    return (t_max + 1.0 - temperature) / t_max  # the same, without 1 - 0.9 = 0.09999999999999998


def psi_at(epoch: int, cfg: ContinuationConfig) -> float:
    """Weight of the CE term at a 0-based epoch i.
    linear: psi = min(i / psi_ramp_epochs, 1) for i <= psi_epochs, then 1 (psi_ramp_epochs 0: psi_epochs).
      psi_ramp_epochs = psi_epochs is a plain ramp to 1 (the paper's vision setting: i / 150 up to 150);
      psi_ramp_epochs > psi_epochs ramps to psi_epochs / psi_ramp_epochs, then jumps to 1 (the paper's
      GLUE setting: i / 40 up to i = 20, so 0.5, then 1).
    step: 0 before psi_epochs, then 1."""
    if cfg.psi == "step":
        return 0.0 if epoch < cfg.psi_epochs else 1.0
    if epoch > cfg.psi_epochs:
        return 1.0
    return min(epoch / (cfg.psi_ramp_epochs or cfg.psi_epochs), 1.0)


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's warm-up factor min(epoch / warmup, 1), counting epochs from 1 as its authors do."""
    return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)
