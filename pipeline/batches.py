"""Training batches that join dataset rows with cached teacher logits by sample id.

Small caches are read once into memory (any order is then free); large ones stream chunk-shuffled
(whole chunks in random order, rows shuffled within a buffer) — never scattered row reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.datasets import Split
from pipeline.errors import KDError
from pipeline.store import LogitStore


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, ...)
    labels: torch.Tensor  # (B,)
    teacher_logits: torch.Tensor | None  # (B, C) raw, float32; None for label-only methods


def positions_of(query_ids: torch.Tensor, dataset_ids: torch.Tensor) -> torch.Tensor:
    """Row position in the dataset of each query id; a KDError if any id is not in the dataset."""
    order = torch.argsort(dataset_ids)
    sorted_ids = dataset_ids[order]
    at = torch.searchsorted(sorted_ids, query_ids).clamp_(max=len(sorted_ids) - 1)
    missing = sorted_ids[at] != query_ids
    if missing.any():
        raise KDError(
            f"{int(missing.sum())} cached sample ids are not in the dataset "
            f"(first: {int(query_ids[missing][0])}): "
            "the cache was made on other data; re-run `kd teacher-logits`"
        )
    return order[at]


class InMemoryBatches:
    """Everything on the device once; each epoch draws a fresh permutation of the training rows."""

    def __init__(
        self,
        split: Split,
        rows: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.inputs = split.inputs.to(device)
        self.labels = split.labels.to(device)
        self.teacher_logits = None if teacher_logits is None else teacher_logits.to(device)
        self.rows = rows.to(device)
        self.batch_size = batch_size
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: every rank walks the same global batches and takes rows rank, rank + world, ..."""
        self.rank, self.world = rank, world

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        order = self.rows[torch.randperm(len(self.rows), generator=generator).to(self.rows.device)]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size][self.rank :: self.world]
            zt = None if self.teacher_logits is None else self.teacher_logits[idx]
            yield Batch(self.inputs[idx], self.labels[idx], zt)


def cached_logits_for(store: LogitStore, split: Split) -> torch.Tensor:
    """The whole cache read into memory and reordered to the dataset's row order: (N, C) float32."""
    logits, _, ids = store.read_all()
    aligned = torch.empty_like(logits)
    aligned[positions_of(ids, split.ids)] = logits
    return aligned


class StreamedBatches:
    """Block-shuffled reads from the store (see LogitStore.iter_shuffled); inputs fetched by sample id;
    rows outside `rows` are skipped."""

    def __init__(
        self,
        store: LogitStore,
        split: Split,
        rows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        buffer_blocks: int = 4,
    ) -> None:
        self.store, self.split = store, split
        self.keep = torch.zeros(len(split), dtype=torch.bool)
        self.keep[rows] = True
        self.batch_size, self.device, self.buffer_blocks = batch_size, device, buffer_blocks
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: every rank reads the same block-shuffled stream and takes its rows of each batch."""
        self.rank, self.world = rank, world

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        carry_pos = torch.empty(0, dtype=torch.int64)
        carry_zt = torch.empty(0, self.store.num_classes)
        for logits, ids in self.store.iter_shuffled(generator, buffer_blocks=self.buffer_blocks):
            pos = positions_of(ids, self.split.ids)
            keep = self.keep[pos]
            pos, zt = torch.cat([carry_pos, pos[keep]]), torch.cat([carry_zt, logits[keep]])
            full = len(pos) - len(pos) % self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._batch(pos[start : start + self.batch_size], zt[start : start + self.batch_size])
            carry_pos, carry_zt = pos[full:], zt[full:]
        if len(carry_pos):
            yield self._batch(carry_pos, carry_zt)

    def _batch(self, pos: torch.Tensor, zt: torch.Tensor) -> Batch:
        pos, zt = pos[self.rank :: self.world], zt[self.rank :: self.world]
        parts = (self.split.inputs[pos], self.split.labels[pos], zt)
        if self.device.type == "cuda":  # pinned host memory: the copies run asynchronously
            parts = tuple(p.pin_memory() for p in parts)
        inputs, labels, logits = (p.to(self.device, non_blocking=True) for p in parts)
        return Batch(inputs, labels, logits)
