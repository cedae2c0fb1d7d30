"""Streamed caches under DDP: shards partitioned across ranks (README "Several GPUs and machines")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.batches import StreamedBatches
from pipeline.datasets import Split
from pipeline.errors import KDError
from pipeline.store import LogitStore
from tests.test_store import fill, make_manifest

ROWS = 83  # with 8-row shards: 11 shards, the last one 3 rows


def cache_and_split(tmp_path: Path) -> tuple[Path, Split, torch.Tensor]:
    path = tmp_path / "c.zarr"
    store = LogitStore.create(path, make_manifest(n=ROWS))
    logits = torch.randn(ROWS, 5)
    fill(store, logits)
    store.finish()
    ids = torch.arange(100, 100 + ROWS)
    split = Split(
        "d",
        "train",
        torch.arange(ROWS, dtype=torch.float32)[:, None],
        torch.zeros(ROWS, dtype=torch.int64),
        ids,
        5,
    )
    return path, split, logits


def rank_epochs(
    path: Path, split: Split, rank: int, world: int, epochs: int, rows: torch.Tensor
) -> tuple[list[list[int]], int]:
    """The rows each epoch gives a rank (dataset positions, in batch order) and the logits bytes it read."""
    store = LogitStore.open(path)
    batches = StreamedBatches(store, split, rows, 8, torch.device("cpu"), buffer_blocks=2)
    batches.shard(rank, world)
    generator = torch.Generator().manual_seed(3)  # the same seed on every rank, as distill seeds them
    seen = []
    for _ in range(epochs):
        seen.append([int(x) for b in batches.epoch(generator) for x in b.inputs[:, 0].tolist()])
    return seen, store.logit_bytes_read


def test_ddp_ranks_read_disjoint_shards_that_cover_the_cache(tmp_path: Path) -> None:
    """README: under torchrun each epoch's shards are dealt across the ranks: every shard is read once
    per epoch in all, and every rank trains on the same number of equal batches."""
    path, split, _ = cache_and_split(tmp_path)
    rows = torch.arange(ROWS)[torch.arange(ROWS) % 10 != 0]  # a validation carve: some rows are skipped
    one_copy = ROWS * 5 * 4  # float32 logits
    results = [rank_epochs(path, split, r, 2, 3, rows) for r in range(2)]
    assert sum(read for _, read in results) == 3 * one_copy  # each epoch reads the cache once, in total
    for epoch in range(3):
        a, b = (set(results[r][0][epoch]) for r in range(2))
        assert not a & b  # disjoint rows, so disjoint shards
        assert len(results[0][0][epoch]) == len(results[1][0][epoch])  # equal numbers of 4-row batches
        assert len(results[0][0][epoch]) % 4 == 0
        dropped = set(rows.tolist()) - a - b
        assert len(dropped) < 2 * 8  # under one shard's rows per rank sit the epoch out
        assert not any(r % 10 == 0 for r in a | b)  # validation rows never train
    assert results[0][0][0] != results[0][0][1]  # shards and rows reshuffled each epoch
    whole, read = rank_epochs(path, split, 0, 1, 1, rows)  # one process: everything, once
    assert sorted(whole[0]) == sorted(rows.tolist()) and read == one_copy


def test_streamed_ddp_needs_a_batch_each_rank_can_share(tmp_path: Path) -> None:
    path, split, _ = cache_and_split(tmp_path)
    batches = StreamedBatches(LogitStore.open(path), split, torch.arange(ROWS), 10, torch.device("cpu"))
    with pytest.raises(KDError, match=r"batch_size \(10\) must be a multiple of the 3 processes"):
        batches.shard(0, 3)
