"""Model factories for the `package.module:factory` tests; what tests expect of the device they run on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Stage 1 runs the teacher in fp32 on the CPU and in `cache.precision` (bf16 by default) on a GPU.
PRECISION = "bf16" if torch.cuda.is_available() else "fp32"


def raw_logit_tolerance(precision: str) -> dict[str, float]:
    """`assert_close` tolerances between stored logits and the teacher's fp32 forward pass: float16
    rounding alone for an fp32 teacher; bf16 autocast rounds to ~3 significant digits on top. Either
    is far below a softened (T > 1) or otherwise transformed logit."""
    return {"atol": 2e-2, "rtol": 2e-3} if precision == "fp32" else {"atol": 0.1, "rtol": 2e-2}


def small_net(num_classes: int, input_shape: Sequence[int], width: int = 16) -> nn.Module:
    features = 1
    for size in input_shape:
        features *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))


def wrong_head(num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """A user's mistake: one logit too many."""
    return small_net(num_classes + 1, input_shape)


def not_a_module(num_classes: int, input_shape: Sequence[int]) -> str:
    return "oops"
