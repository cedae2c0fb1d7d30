"""A method's training phases as the loop runs them: each phase's loss (a `pipeline.distill.losses.LOSSES`
function) with its keyword arguments at an epoch, from the method's record (pipeline.distill.methods).

    for phase in phases(preset.distill):
        fit(model, phase.optim, loss_at=phase.loss_at, ...)   # a fresh optimizer and LR schedule each
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import DistillConfig, OptimConfig
from pipeline.distill.losses import LOSSES
from pipeline.distill.methods import method, settings_at
from pipeline.distill.methods import phases as method_phases


@dataclass(frozen=True)
class Phase:
    name: str
    loss: str  # a LOSSES key
    optim: OptimConfig
    settings: Callable[[int], dict[str, Any]]  # epoch in the phase (0-based) -> the loss's keyword arguments
    method: str = ""  # the method record it trains (pipeline.distill.methods): Annealing-KD's phase 2 is "ce"

    def loss_at(self, epoch: int) -> Callable[..., torch.Tensor]:
        """The phase's loss with this epoch's settings bound."""
        return functools.partial(LOSSES[self.loss], **self.settings(epoch))


def phases(cfg: DistillConfig) -> list[Phase]:
    """The training phases of the method (pipeline.distill.methods), each with its loss's settings per
    epoch."""
    return [
        Phase(
            plan.name,
            method(plan.method).loss_name,
            plan.optim,
            functools.partial(settings_at, cfg, plan.method),
            plan.method,
        )
        for plan in method_phases(cfg)
    ]


def numbers(settings: dict[str, Any]) -> dict[str, float]:
    """The numeric settings of a loss's keyword arguments (what metrics.jsonl logs per epoch)."""
    return {k: v for k, v in settings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
