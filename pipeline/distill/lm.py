"""Language models: the batches of token sequences stage 2 trains on (`SequenceBatches`), from a sparse
cache in memory or streamed (`StreamedSequences`), from the teacher run online, or from labels alone.
The losses are pipeline.distill.losses' (`hinton_kd` on (B, L, V) logits, its sparse targets described there),
the loop pipeline.training.loop's (`fit` with `SEQUENCES`: perplexity selects the checkpoint).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.datasets import Split
from pipeline.distill.batches import Batch, ShardStream, cut_batches, positions_of
from pipeline.distill.targets import SparseTargets
from pipeline.models import teacher_autocast
from pipeline.store.reader import Buffer
from pipeline.store.sparse import PAD_LABEL


class StreamedSequences(ShardStream):
    """Training batches from a sparse cache too big for memory (see ShardStream: whole shards in random
    order, each checked against its checksum, rows shuffled within a buffer; under DDP each rank its own
    shards): (positions of the sequences in the split, their teacher side on the CPU)."""

    def _epoch(
        self, generator: torch.Generator, batch_size: int, shards: list[int] | None
    ) -> Iterator[tuple[torch.Tensor, SparseTargets]]:
        m = self.store.manifest

        def parts() -> Iterator[tuple[torch.Tensor, Callable[[int, int], Held]]]:
            for buffer in self.store.iter_buffers(generator, shards=shards):
                at = positions_of(buffer.ids[buffer.order], self.split_ids)
                keep = self.keep[at]
                yield at[keep], functools.partial(_rows_of, buffer, buffer.order[keep])

        def join(a: Held, b: Held) -> Held:
            return torch.cat([a[0], b[0]]), {name: np.concatenate([a[1][name], b[1][name]]) for name in a[1]}

        for pos, (values, extras) in cut_batches(parts(), batch_size, join):
            yield pos, SparseTargets.from_arrays(values, extras, m.sparse, m.storage.dtype)


Held = tuple[torch.Tensor, dict[str, np.ndarray]]  # top-k values and the other arrays of some rows


def _rows_of(buffer: Buffer, rows: torch.Tensor, a: int, b: int) -> Held:
    """Rows rows[a:b] of a streamed buffer: its top-k values and its other arrays."""
    at = rows[a:b]
    return buffer.values[at], {name: array[at.numpy()] for name, array in buffer.extras.items()}


class SequenceBatches:
    """Global batches of the training sequences `rows` of a split, with their teacher side: a sparse
    cache's targets held in memory (`targets`, indexed by position in the split), a streamed one
    (`stream`), the teacher run online (`teacher`, dense logits), or nothing (labels alone). Under DDP
    (`shard`) each rank takes every world-th row of each global batch (a last batch with fewer rows than
    processes is skipped by all, so all step together), a streamed cache each rank its own shards; each
    batch's `scale` weights its gradient by this rank's share of the global batch's real tokens, so the
    averaged gradients are those of one process's mean over the real tokens."""

    def __init__(
        self,
        split: Split,
        rows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        *,
        targets: SparseTargets | None = None,
        stream: StreamedSequences | None = None,
        teacher: torch.nn.Module | None = None,
        precision: str = "fp32",
    ) -> None:
        self.split, self.rows, self.batch_size, self.device = split, rows, batch_size, device
        self.targets, self.stream, self.teacher, self.precision = targets, stream, teacher, precision
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        if self.stream is not None:
            self.stream.shard(rank, world)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        split, device = self.split, self.device
        if self.stream is not None:
            for rows, side in self.stream.epoch(generator):
                x, y = split.inputs[rows].to(device), split.labels[rows].to(device)
                scale = 1.0
                if self.world > 1:  # this rank's share of the global batch's real tokens
                    real = (y != PAD_LABEL).sum()
                    both = real.clone()
                    torch.distributed.all_reduce(both)
                    scale = self.world * float(real) / max(float(both), 1.0)
                yield Batch(x, y, side.to(device), scale=scale)
            return
        order = self.rows[torch.randperm(len(self.rows), generator=generator)]
        for i in range(0, len(order), self.batch_size):
            rows, scale = order[i : i + self.batch_size], 1.0
            if self.world > 1:
                if len(rows) < self.world:
                    continue
                real = split.labels[rows] != PAD_LABEL
                mine = torch.arange(len(rows))[self.rank :: self.world]
                scale = self.world * float(real[mine].sum()) / max(float(real.sum()), 1.0)
                rows = rows[mine]
            x, y = split.inputs[rows].to(device), split.labels[rows].to(device)
            side: Any = None
            if self.targets is not None:
                side = self.targets.rows(rows, device)
            elif self.teacher is not None:
                with torch.no_grad(), teacher_autocast(device, self.precision):
                    side = self.teacher(x).float()
            yield Batch(x, y, side, scale=scale)
