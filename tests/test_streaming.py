"""Streamed caches under DDP: shards partitioned across ranks (README "Several GPUs and machines")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.data.datasets import Split
from pipeline.distill.batches import StreamedBatches
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


def test_streamed_ddp_refuses_a_rank_with_nothing_to_read(tmp_path: Path) -> None:
    """Each process reads whole shards: more processes than shards, or shards too small for a rank's
    share of a batch, would train on nothing without a word (seen under torchrun): one line instead."""
    path, split, _ = cache_and_split(tmp_path)  # 11 shards of 8 rows
    batches = StreamedBatches(LogitStore.open(path), split, torch.arange(ROWS), 12, torch.device("cpu"))
    with pytest.raises(KDError, match="has 11 shard\\(s\\) but 12 processes stream it"):
        batches.shard(0, 12)
    few = torch.arange(ROWS)[torch.arange(ROWS) % 8 == 0]  # one training row a shard
    batches = StreamedBatches(LogitStore.open(path), split, few, 16, torch.device("cpu"))
    batches.shard(0, 2)  # 8 rows a rank's share of a batch, 5 or 6 rows a rank's shards
    with pytest.raises(KDError, match="a process's shards hold fewer than 8 training rows"):
        next(iter(batches.epoch(torch.Generator().manual_seed(0))))


def test_the_local_shard_cache_keeps_to_its_byte_budget(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.store.shard_cache import ShardCache

    arrays = {"logits": np.zeros((100, 10), dtype=np.float16), "labels": np.zeros(100, dtype=np.int64)}
    cache = ShardCache(tmp_path / "shards", budget_bytes=10**9)
    cache.put(0, arrays)
    size = cache.nbytes  # one shard's file
    cache = ShardCache(tmp_path / "shards", budget_bytes=int(2.5 * size))  # reopened: shard 0 is held
    assert cache.get(0) is not None and cache.hits == 1
    cache.put(1, arrays)
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(2, arrays)  # over budget: the least recently used (1) goes
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-0.npz", "shard-2.npz"]
    assert cache.get(1) is None and cache.misses == 1 and cache.nbytes <= 2.5 * size
    np.testing.assert_array_equal(cache.get(2)["logits"], arrays["logits"])  # type: ignore[index]


def test_a_far_cache_opens_again_from_the_records_kept_beside_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lazily streamed cache's ids and done flags are kept with its shards: the next open (a sweep's
    next run) reads no per-shard object from the far store, unless its manifest changed."""
    import dataclasses

    from pipeline.store.shard_cache import ShardCache

    path, _, _ = cache_and_split(tmp_path)
    reads: list[str] = []

    def opened() -> LogitStore:
        store = LogitStore.open(path)
        store.shard_cache = ShardCache(tmp_path / "shards", 10**9)
        read, records = store.read, store.records
        monkeypatch.setattr(store, "read", lambda name, *a: reads.append(name) or read(name, *a))
        monkeypatch.setattr(store, "records", lambda name: reads.append(name) or records(name))
        store.require_complete()
        return store

    first = opened()
    assert reads == ["done", "index"] and torch.equal(first.ids, torch.arange(100, 100 + ROWS))
    reads.clear()
    again = opened()
    assert torch.equal(again.ids, first.ids) and again.shards_done().all() and reads == []
    manifest = dataclasses.replace(again.manifest, teacher_accuracy=0.5)  # the far cache was rebuilt
    LogitStore.open(path, writable=True).group.attrs.put(manifest.to_dict())
    rebuilt = opened()
    assert reads == ["done", "index"] and torch.equal(rebuilt.ids, first.ids)
    reads.clear()
    incomplete = dataclasses.replace(manifest, complete=False)  # never kept, never trusted
    LogitStore.open(path, writable=True).group.attrs.put(incomplete.to_dict())
    with pytest.raises(KDError, match="is incomplete"):
        opened()
    assert reads == ["done"]  # read from the store, for the message


@pytest.mark.slow
def test_a_far_cache_streams_lazily_and_trains_as_the_local_one(tiny_data, tmp_path: Path, s3: str) -> None:
    """README: a remote cache larger than the memory budget is streamed shard by shard through a bounded
    local shard cache, never copied whole; the run equals a streamed run from local disk."""
    import json

    from pipeline.config import Paths
    from tests.conftest import cache_paths
    from tests.test_cli import kd

    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/lazy-{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).exit_code == 0
    stream = ["--epochs", "3", "--set", "distill.memory_budget_mb=0"]
    paths = Paths(data=tmp_path / "far")
    far = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--run-name", "far", *stream)
    assert far.exit_code == 0, far.output
    assert "streaming" in far.stderr and "lazily" in far.stderr
    (folder,) = (paths.data / "remote-cache" / "shards").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["records.npz"] + [f"shard-{i}.npz" for i in range(4)]
    assert not list((paths.data / "remote-cache").glob("*.zarr"))  # no whole copy
    near = kd(tiny_data, "distill", "--preset", "tiny", "--cache", str(train), "--run-name", "near", *stream)
    assert near.exit_code == 0, near.output

    def curve(root: Path, name: str) -> list[float]:
        return [json.loads(line)["val_accuracy"] for line in (root / "runs" / name / "metrics.jsonl").open()]

    assert curve(paths.data, "far") == curve(tiny_data.data, "near")
    # a budget smaller than a shard keeps nothing, and still trains
    small = kd(
        paths,
        "distill",
        "--preset",
        "tiny",
        "--cache",
        url,
        "--run-name",
        "small",
        *stream,
        "--set",
        "distill.remote_cache_mb=0",
    )
    assert small.exit_code == 0, small.output
    assert curve(paths.data, "small") == curve(tiny_data.data, "near")


@pytest.mark.slow
def test_a_corrupted_remote_shard_is_refused_in_one_line(tiny_data, tmp_path: Path, s3: str) -> None:
    import fsspec

    from pipeline.config import Paths
    from tests.conftest import cache_paths
    from tests.test_cli import kd

    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/corrupt-{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).exit_code == 0
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/logits/c/0/0", fs.cat(f"{root}/logits/c/1/0"))  # shard 1's bytes under shard 0's name
    paths = Paths(data=tmp_path / "far")
    argv = [
        "distill",
        "--preset",
        "tiny",
        "--cache",
        url,
        "--epochs",
        "2",
        "--set",
        "distill.memory_budget_mb=0",
    ]
    result = kd(paths, *argv)  # found once training reaches that shard: after the run's opening lines
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shard 0 fails its CRC32C checksum" in errors[0], result.stderr
    folder = paths.data / "remote-cache" / "shards"
    assert not any(p.name == "shard-0.npz" for p in folder.rglob("*"))  # never kept locally


def test_batches_are_cut_across_parts_and_gathered_batch_by_batch() -> None:
    """Streamed training cuts each buffer's kept rows into batches, the rows left over going first
    into the next buffer's first batch, and gathers the targets of one batch at a time."""
    from pipeline.distill.batches import cut_batches

    asked: list[tuple[int, int, int]] = []

    def part(k: int, size: int) -> tuple[torch.Tensor, object]:
        rows = torch.arange(100 * k, 100 * k + size)

        def take(a: int, b: int) -> torch.Tensor:
            asked.append((k, a, b))
            return -rows[a:b]  # the targets of rows a..b-1

        return rows, take

    sizes = [5, 2, 0, 7, 3]
    got = list(cut_batches((part(k, n) for k, n in enumerate(sizes)), 4, lambda a, b: torch.cat([a, b])))
    everything = torch.cat([torch.arange(100 * k, 100 * k + n) for k, n in enumerate(sizes)])
    assert [len(pos) for pos, _ in got] == [4, 4, 4, 4, 1]
    assert torch.equal(torch.cat([pos for pos, _ in got]), everything)
    assert all(torch.equal(targets, -pos) for pos, targets in got)
    assert all(b - a <= 4 for _, a, b in asked)  # never a whole part at once
