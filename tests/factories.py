"""A model factory for the `package.module:factory` tests."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


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
