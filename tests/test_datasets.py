from __future__ import annotations

import dataclasses

import torch

from pipeline.config import load_preset
from pipeline.data.datasets import _built, load_split, validation_rows
from pipeline.distill.batches import InMemoryBatches, StreamedBatches, cached_logits_for, positions_of
from pipeline.store import DatasetInfo, LogitStore, Manifest, ShardWriter, StorageInfo, TeacherInfo


def test_mnist1d_is_deterministic_with_disjoint_ids() -> None:
    cfg = load_preset("tiny").dataset
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (800, 200) and train.input_shape == (40,)
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    _built.clear()
    again = load_split(cfg, "train")
    assert again is not train and again.fingerprint == train.fingerprint
    other = load_split(dataclasses.replace(cfg, seed=7), "train")
    assert other.fingerprint != train.fingerprint


def test_mnist1d_is_generated_once_and_kept(tmp_path, monkeypatch) -> None:
    """The generated arrays are kept (~/.cache/kd): the next command reads them, the same samples; a
    damaged file, or other generator settings, are generated again."""
    import mnist1d.data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = dataclasses.replace(load_preset("tiny").dataset, seed=11)
    _built.clear()
    made = load_split(cfg, "train")
    (kept,) = (tmp_path / "kd").glob("mnist1d-*.npz")

    def no_generating(args):
        raise AssertionError("generated again")

    calls = []
    generate = mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generating)
    _built.clear()
    read = load_split(cfg, "train")
    assert read.fingerprint == made.fingerprint and torch.equal(read.inputs, made.inputs)

    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: calls.append(args) or generate(args))
    raw = bytearray(kept.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte inside the arrays
    kept.write_bytes(bytes(raw))
    _built.clear()
    assert load_split(cfg, "train").fingerprint == made.fingerprint and len(calls) == 1
    _built.clear()
    assert load_split(cfg, "test").fingerprint and len(calls) == 1  # the rewritten file is read
    _built.clear()
    load_split(dataclasses.replace(cfg, seed=12), "train")
    assert len(calls) == 2 and len(list((tmp_path / "kd").glob("mnist1d-*.npz"))) == 2


def test_validation_rows_are_deterministic_and_disjoint() -> None:
    rows, val = validation_rows(100, 10, seed=3)
    rows2, val2 = validation_rows(100, 10, seed=3)
    assert torch.equal(val, val2) and torch.equal(rows, rows2)
    assert len(val) == 10 and not set(rows.tolist()) & set(val.tolist())
    assert sorted(rows.tolist() + val.tolist()) == list(range(100))


def test_positions_of_joins_by_id() -> None:
    dataset_ids = torch.tensor([30, 10, 20])
    assert positions_of(torch.tensor([20, 30, 10]), dataset_ids).tolist() == [2, 0, 1]


def test_streamed_and_in_memory_batches_agree(tmp_path) -> None:
    """Both loaders join the same teacher logits to the same rows; the cache is written out of order."""
    split = load_split(load_preset("tiny").dataset, "train")
    logits = torch.randn(len(split), split.num_classes)
    order = torch.randperm(len(split))  # cache rows in another order than the dataset's
    manifest = Manifest(
        teacher=TeacherInfo(name="t", architecture={}, fingerprint="0" * 64),
        dataset=DatasetInfo(
            name="mnist1d", split="train", length=len(split), num_classes=10, fingerprint=split.fingerprint
        ),
        storage=StorageInfo(dtype="float32", chunk_rows=64, shard_rows=256),
    )
    store = LogitStore.create(tmp_path / "c.zarr", manifest)
    writer = ShardWriter(store)
    writer.add(logits[order], split.labels[order], split.ids[order])
    writer.close()
    store.finish()

    assert torch.equal(cached_logits_for(store, split), logits)
    rows, _ = validation_rows(len(split), 100, seed=0)
    cpu = torch.device("cpu")
    for loader in (
        InMemoryBatches(split, rows, logits, 32, cpu),
        StreamedBatches(store, split, rows, 32, cpu, 3),
    ):
        seen = []
        for batch in loader.epoch(torch.Generator().manual_seed(1)):
            # find each row by its input vector: ids are not part of a Batch
            match = (batch.inputs[:, None, :] == split.inputs[None, :, :]).all(-1).float().argmax(1)
            assert torch.equal(batch.teacher_logits, logits[match])
            assert torch.equal(batch.labels, split.labels[match])
            seen += match.tolist()
        assert sorted(seen) == rows.tolist()


def test_an_option_a_builder_does_not_read_is_refused_by_name() -> None:
    """`num_samples` under dataset.options used to be ignored silently (5,000 rows were used)."""
    import dataclasses

    import pytest

    from pipeline.errors import KDError

    cfg = dataclasses.replace(load_preset("tiny").dataset, options={"num_samples": 200})
    with pytest.raises(KDError) as err:
        load_split(cfg, "train")
    assert str(err.value) == (
        "unknown dataset.options 'num_samples' for 'mnist1d' (dataset.num_samples is a dataset setting, "
        "not an option): its options are none"
    )
    npz = dataclasses.replace(cfg, name="npz", options={"train": "a.npz", "test": "b.npz", "classes": 3})
    with pytest.raises(KDError, match="unknown dataset.options 'classes' for 'npz': its options are name, "):
        load_split(npz, "train")
