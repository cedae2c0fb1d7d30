"""Schedules: pure functions of the (0-based) epoch, called explicitly in the loop.

T = temperature_at(epoch, cfg)        alpha = alpha_at(epoch, cfg)
T = annealing_temperature(epoch, ...) phi = phi(T, t_max)       psi = psi_at(epoch, ...)
"""

from __future__ import annotations

import math

from pipeline.config import ContinuationConfig, DistillConfig, OptimConfig


def lr_at(epoch: int, cfg: OptimConfig) -> float:
    """Learning rate: constant, cosine from cfg.lr down to 0 over cfg.epochs, or step (x0.1 at 50%, 75%)."""
    if cfg.schedule == "constant":
        return cfg.lr
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


def annealing_temperature(epoch: int, phase1_epochs: int, tau_max: int) -> int:
    """Annealing-KD: integer T from tau_max down to 1, one step every phase1_epochs / tau_max epochs."""
    return max(1, tau_max - (epoch * tau_max) // phase1_epochs)


def continuation_temperature(epoch: int, anneal_epochs: int, t_max: int) -> int:
    """Continuation-KD: T starts at t_max and drops by 1 every k = floor(n / t_max) epochs, clamped at 1."""
    k = max(1, anneal_epochs // t_max)
    return max(1, t_max - epoch // k)


def phi(temperature: float, t_max: int) -> float:
    """phi(T) = 1 - (T - 1) / t_max: the fraction of the teacher's logits the student is asked to match."""
    return 1.0 - (temperature - 1.0) / t_max


def psi_at(epoch: int, cfg: ContinuationConfig) -> float:
    """Weight of the CE term: a linear ramp 0 -> 1 over psi_epochs, or a 0 -> 1 step at psi_epochs."""
    if cfg.psi == "step":
        return 0.0 if epoch < cfg.psi_epochs else 1.0
    return min(epoch / cfg.psi_epochs, 1.0)


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's warm-up factor min(epoch / warmup, 1), counting epochs from 1 as its authors do."""
    return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)
