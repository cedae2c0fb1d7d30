"""Schedules: pure functions of the epoch, called explicitly in the loop (`lr = lr_at(epoch, cfg)`)."""

from __future__ import annotations

import math

from pipeline.config import OptimConfig


def lr_at(epoch: int, cfg: OptimConfig) -> float:
    """Learning rate for 0-based `epoch`: constant, or cosine from cfg.lr down to 0 over cfg.epochs."""
    if cfg.schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
