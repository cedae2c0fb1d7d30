"""The teacher side of a batch as losses take it, and the transforms applied to raw logits as each batch
loads (the cache only ever holds raw logits): a dense teacher is a float32 tensor of logits (B, C) or
(B, L, V); a sparse language-model cache gives `SparseTargets`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store.encoding import decode_logits
from pipeline.store.sparse import stored_at, uniform_tail_logit

SPARSE_TARGETS = ("topk-tail", "topk", "sampled")


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row over its last axis, (z - mean) / (std + eps) (Sun et al., CVPR 2024, logit
    standardization): (B, C), or (N, B, C) for N students at once."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


@dataclass(frozen=True)
class SparseTargets:
    """The teacher side of a batch of token sequences, as a sparse cache stores it (float32 on device)."""

    values: torch.Tensor  # (B, L, k) raw top-k logits
    ids: torch.Tensor  # (B, L, k) int64
    lse: torch.Tensor  # (B, L, T) logsumexp of the full row at each stored temperature
    temperatures: tuple[float, ...]
    vocab: int
    sampled_ids: torch.Tensor | None = None  # (B, L, S) int64
    sampled_logits: torch.Tensor | None = None  # (B, L, S)

    @classmethod
    def from_arrays(
        cls, values: torch.Tensor, extras: Mapping[str, np.ndarray], entry: Mapping, storage: str = "float16"
    ) -> SparseTargets:
        """From a sparse cache's arrays as read (LogitStore.read_everything): ids widened to int64, the
        sampled logits decoded from the storage dtype."""

        def ids(name: str) -> torch.Tensor | None:
            return torch.from_numpy(extras[name].astype(np.int64)) if name in extras else None

        sampled = extras.get("sampled_logits")
        return cls(
            values=values.float(),
            ids=ids("topk_ids"),
            lse=torch.from_numpy(np.asarray(extras["lse"], dtype=np.float32)),
            temperatures=tuple(float(t) for t in entry["lse_temperatures"]),
            vocab=int(entry["vocab"]),
            sampled_ids=ids("sampled_ids"),
            sampled_logits=None if sampled is None else decode_logits(sampled, storage).float(),
        )

    def rows(self, index: torch.Tensor, device: torch.device) -> SparseTargets:
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index].to(device, non_blocking=True)

        return SparseTargets(
            take(self.values), take(self.ids), take(self.lse), self.temperatures, self.vocab,
            take(self.sampled_ids), take(self.sampled_logits),
        )  # fmt: skip

    def to(self, device: torch.device) -> SparseTargets:
        return self.rows(slice(None), device)  # type: ignore[arg-type]

    def has_temperature(self, t: float) -> bool:
        return stored_at(self.temperatures, t) is not None

    def lse_at(self, t: float) -> torch.Tensor:
        """logsumexp(z / t) of the full rows (B, L): stored, or the uniform-tail approximation."""
        i = stored_at(self.temperatures, t)
        if i is not None:
            return self.lse[..., i]
        kept = torch.logsumexp(self.values / t, -1)
        missing = self.vocab - self.values.shape[-1]
        if missing == 0:
            return kept
        u = uniform_tail_logit(self.values, self.lse[..., 0], self.temperatures[0], self.vocab)
        return torch.logaddexp(kept, math.log(missing) + u / t)
