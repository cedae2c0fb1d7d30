"""How logits are stored: zarr codecs by name, and float logits <-> the on-disk dtype (bfloat16 as bits)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import KDError

CODECS = ("zstd", "blosc-zstd", "blosc-bitshuffle")


def compressors(codec: str, level: int, itemsize: int) -> list[Any]:
    """Zarr v3 codecs by name: plain zstd, or Blosc-zstd after a byte (or bit) shuffle."""
    if codec == "zstd":
        return [ZstdCodec(level=level)]
    if codec in ("blosc-zstd", "blosc-bitshuffle"):
        shuffle = "shuffle" if codec == "blosc-zstd" else "bitshuffle"
        return [BloscCodec(cname="zstd", clevel=min(level, 9), shuffle=shuffle, typesize=itemsize)]
    raise KDError(f"unknown codec '{codec}': choose one of {', '.join(CODECS)}")


def encode_logits(logits: torch.Tensor, dtype: str) -> np.ndarray:
    """float logits (B, C) -> the on-disk array for a storage dtype."""
    if dtype == "bfloat16":
        return logits.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return logits.detach().to("cpu", getattr(torch, dtype)).numpy()


def decode_logits(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """The on-disk array -> float32 logits (B, C)."""
    return stored_float(as_tensor(stored), dtype).float()


def as_tensor(stored: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of an on-disk array (uint16 bfloat16 bits as int16)."""
    stored = np.ascontiguousarray(stored)
    return torch.from_numpy(stored.view(np.int16) if stored.dtype == np.uint16 else stored)


def stored_float(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored values as their float type (bfloat16 bits reinterpreted), not yet widened: a copy_ into
    float32 widens them in place."""
    return raw.view(torch.bfloat16) if dtype == "bfloat16" else raw
