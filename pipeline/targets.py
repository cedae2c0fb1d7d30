"""Transforms applied to raw logits as each batch loads: the cache only ever holds raw logits."""

from __future__ import annotations

import torch


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row, (z - mean) / (std + eps) (Sun et al., CVPR 2024, logit standardization). (B, C)"""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)
