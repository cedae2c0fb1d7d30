from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import KDError
from pipeline.store import (
    DatasetInfo,
    LogitStore,
    Manifest,
    ShardWriter,
    StorageInfo,
    TeacherInfo,
    decode_logits,
    encode_logits,
)

N, C = 21, 5  # 21 rows with 8-row shards of 4-row chunks: 3 shards, the last one partial


def make_manifest(dtype: str = "float32", n: int = N) -> Manifest:
    return Manifest(
        teacher=TeacherInfo(name="t", architecture={"arch": "mlp"}, fingerprint="ab" * 32),
        dataset=DatasetInfo(name="d", split="train", length=n, num_classes=C, fingerprint="cd" * 32),
        storage=StorageInfo(dtype=dtype, chunk_rows=4, shard_rows=8),
        preprocessing={"normalization": "none"},
        created="2026-01-01T00:00:00+00:00",
    )


def fill(store: LogitStore, logits: torch.Tensor, batch: int = 5) -> None:
    """Write through the background writer in batches that straddle shard boundaries."""
    writer = ShardWriter(store)
    labels, ids = torch.arange(len(logits)) % C, torch.arange(100, 100 + len(logits))
    for start in range(0, len(logits), batch):
        writer.add(logits[start : start + batch], labels[start : start + batch], ids[start : start + batch])
    writer.close()


@pytest.fixture(params=["local", "memory"])
def target(request: pytest.FixtureRequest, tmp_path):
    return tmp_path / "c.zarr" if request.param == "local" else zarr.storage.MemoryStore()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_across_shard_boundaries(target, dtype: str) -> None:
    logits = torch.randn(N, C) * 7
    store = LogitStore.create(target, make_manifest(dtype))
    assert store.num_shards == 3 and store.shard_range(2) == (16, 21)
    fill(store, logits)
    store.finish(teacher_accuracy=0.5)

    reopened = (
        LogitStore(zarr.open_group(target, mode="r"), "x")
        if not isinstance(target, os.PathLike)
        else LogitStore.open(target)
    )
    reopened.require_complete()
    got, labels, ids = reopened.read_all()
    expected = logits.to(getattr(torch, dtype)).float()
    assert torch.equal(got, expected)
    assert torch.equal(labels, torch.arange(N) % C)
    assert torch.equal(ids, torch.arange(100, 100 + N))
    assert reopened.manifest.complete and reopened.manifest.teacher_accuracy == 0.5


def test_shards_are_separate_objects_on_disk(tmp_path) -> None:
    path = tmp_path / "c.zarr"
    store = LogitStore.create(path, make_manifest())
    fill(store, torch.randn(N, C))
    shard_files = sorted(p.name for p in (path / "logits" / "c").iterdir())
    assert shard_files == ["0", "1", "2"]  # one object per shard row-block
    meta = zarr.open_array(path / "logits", mode="r")
    assert meta.shards == (8, C) and meta.chunks == (4, C)
    assert meta.compressors[0].to_dict()["name"] == "zstd"


def test_encode_decode_dtypes() -> None:
    x = torch.randn(3, 4)
    assert encode_logits(x, "bfloat16").dtype == np.uint16
    assert torch.equal(decode_logits(encode_logits(x, "bfloat16"), "bfloat16"), x.bfloat16().float())
    assert encode_logits(x, "float16").dtype == np.float16


def test_incomplete_cache_is_refused(tmp_path) -> None:
    path = tmp_path / "c.zarr"
    store = LogitStore.create(path, make_manifest())
    store.write_shard(0, np.zeros((8, C), np.float32), np.zeros(8, np.int64), np.arange(8))
    with pytest.raises(KDError, match="shards \\[1, 2\\] are not written"):
        store.finish()
    with pytest.raises(KDError, match="incomplete \\(1/3 shards"):
        LogitStore.open(path).require_complete()


def test_complete_flag_alone_is_not_trusted(tmp_path) -> None:
    path = tmp_path / "c.zarr"
    store = LogitStore.create(path, make_manifest())
    store.group.attrs.put(dataclasses.replace(store.manifest, complete=True).to_dict())
    with pytest.raises(KDError, match="incomplete"):
        LogitStore.open(path).require_complete()


def test_create_refuses_to_overwrite(tmp_path) -> None:
    path = tmp_path / "c.zarr"
    LogitStore.create(path, make_manifest())
    with pytest.raises(KDError, match="already exists"):
        LogitStore.create(path, make_manifest())


def test_open_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(KDError, match="no logit cache at"):
        LogitStore.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(KDError, match="not a kd logit cache"):
        LogitStore.open(tmp_path / "plain.zarr")


@pytest.mark.parametrize(("block_rows", "parts"), [(None, 2), (4, 3)])
def test_shuffled_stream_reads_every_row_once(tmp_path, block_rows: int | None, parts: int) -> None:
    store = LogitStore.create(tmp_path / "c.zarr", make_manifest())
    logits = torch.randn(N, C)
    fill(store, logits)
    got = list(store.iter_buffers(torch.Generator().manual_seed(0), block_rows=block_rows, buffer_blocks=2))
    got_logits = torch.cat([b.values[b.order] for b in got])  # each buffer taken in its shuffled order
    got_ids = torch.cat([b.ids[b.order] for b in got])
    assert sorted(got_ids.tolist()) == list(range(100, 100 + N))
    assert torch.equal(got_logits, logits[got_ids - 100])
    assert got_ids.tolist() != list(range(100, 100 + N))  # actually shuffled
    # buffers of 2 blocks: shards of 8 rows (8+8, then the 5-row tail) or chunks of 4 rows (6 blocks)
    assert len(got) == parts


def test_manifest_round_trip_and_key() -> None:
    m = make_manifest()
    again = Manifest.from_dict(m.to_dict())
    assert again == m
    assert m.key == again.key and len(m.key) == 64
    other = dataclasses.replace(m, storage=StorageInfo(dtype="float16", chunk_rows=4, shard_rows=8))
    assert other.key != m.key


def test_unsupported_format_version() -> None:
    raw = make_manifest().to_dict()
    raw["format"]["version"] = 99
    with pytest.raises(KDError, match="version 99 is not supported"):
        Manifest.from_dict(raw)


def test_verify_passes_a_good_store_and_names_each_problem(tmp_path) -> None:
    path = tmp_path / "c.zarr"
    store = LogitStore.create(path, make_manifest("float16"))
    logits = torch.randn(N, C)
    writer = ShardWriter(store)
    writer.add(logits, logits.argmax(1), torch.arange(N))  # labels = argmax: accuracy 1.0
    writer.close()
    store.finish()
    assert LogitStore.open(path).verify() == []
    assert store.manifest.teacher_accuracy == 1.0 and len(store.manifest.shard_crc32c) == 3

    group = zarr.open_group(path, mode="r+")
    group["logits"][0, 0] = float(
        "nan"
    )  # written through zarr: a valid file with a bad value and no matching checksum
    group["labels"][9] = (int(logits[9].argmax()) + 1) % C
    problems = LogitStore.open(path).verify()
    assert any("shard 0" in p and "CRC32C" in p for p in problems)
    assert any(p.startswith("shard 0 (rows 0-8) has 1 rows with NaN") for p in problems)
    assert any("shard 1" in p and "CRC32C" in p for p in problems)
    assert not any("shard 2" in p for p in problems)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_non_finite_rows_are_found_from_the_stored_bits(dtype: str) -> None:
    """Streaming and in-memory reads find NaN/Inf on the stored bits (no float pass): the same rows as
    the float check, and none among the largest finite and the smallest subnormal values."""
    from pipeline.store.encoding import encode_logits
    from pipeline.store.integrity import nonfinite_rows, stored_nonfinite_rows

    finfo = torch.finfo(getattr(torch, dtype))
    logits = torch.randn(6, 2, 5)
    logits[0, 0, 0], logits[1, 1, 4], logits[2, 0, 2] = finfo.max, -finfo.max, finfo.smallest_normal / 4
    stored = encode_logits(logits, dtype)
    assert stored_nonfinite_rows(stored) is None
    logits[3, 1, 1], logits[5, 0, 3], logits[4] = float("nan"), float("inf"), -float("inf")
    stored = encode_logits(logits, dtype)
    found = stored_nonfinite_rows(stored)
    assert found is not None and found.tolist() == [False, False, False, True, True, True]
    assert found.tolist() == nonfinite_rows(logits).tolist()
    assert stored_nonfinite_rows(stored[:0]) is None


def test_the_lock_and_manifest_load_without_torch() -> None:
    """pipeline/store/__init__.py: a process that only holds a cache's lock (or reads a manifest)
    does not import torch."""
    import subprocess
    import sys

    code = "import sys; from pipeline.store import cache_lock, Manifest; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "False"), result.stderr
