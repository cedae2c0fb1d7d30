"""Training-time input augmentation, on whole batches on their device.

The cache holds the teacher's logits for the fixed, un-augmented view of each sample, so an augmented
student is matched to targets computed on another view (Beyer et al. 2022 measure the cost of this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import KDError

AUGMENTS = ("none", "crop-flip")


def crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The CIFAR recipe on a batch (B, C, H, W): zero-pad, random crop back to H x W, random h-flip."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device)
    rows = (torch.arange(h, device=images.device) + dy)[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w, device=images.device) + dx)[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(b, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped).contiguous()


def check_augment(kind: str, inputs: torch.Tensor) -> None:
    """Refuse, before any training, an augmentation that does not fit the data."""
    if kind != "none" and inputs.dim() != 4:
        raise KDError(
            f"augment '{kind}' needs images (C, H, W), got inputs of shape {tuple(inputs.shape[1:])}: "
            'set augment = "none" for this data'
        )


def augment(images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "none":
        return images
    check_augment(kind, images)
    return crop_flip(images)
