"""Edge cases and defaults of the core functions, found by `make mutation` (mutants that survived the
other tests): published defaults, schedule boundaries, every verify message, the join's errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from pipeline.config import OptimConfig
from pipeline.data.datasets import Split
from pipeline.distill.batches import InMemoryBatches, positions_of
from pipeline.distill.losses import annealing, continuation, cross_entropy, dist, dkd, hinton_kd
from pipeline.distill.schedules import interpolate, lr_at, step_temperature
from pipeline.distill.targets import standardize
from pipeline.errors import KDError
from pipeline.store import LogitStore, ShardWriter, shard_digest
from pipeline.store.integrity import summarize
from tests.test_store import C, N, make_manifest


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(6, 5, generator=g),
        3 * torch.randn(6, 5, generator=g),
        torch.randint(0, 5, (6,), generator=g),
    )


def test_published_defaults_of_the_losses(batch) -> None:  # noqa: ANN001
    zs, zt, y = batch
    published = {"alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup": 1.0}  # DKD, Zhao et al. 2022
    assert torch.equal(dkd(zs, zt, y, temperature=2.0), dkd(zs, zt, y, temperature=2.0, **published))
    published = {"beta": 1.0, "gamma": 1.0, "weight": 2.0}  # DIST, Huang et al. 2022
    assert torch.equal(dist(zs, zt, y, temperature=2.0), dist(zs, zt, y, temperature=2.0, **published))
    assert torch.equal(cross_entropy(zs, None, y), F.cross_entropy(zs, y))
    assert torch.equal(annealing(zs, zt, y, phi=0.5), ((zs - 0.5 * zt) ** 2).sum(1).mean())
    assert torch.equal(continuation(zs, zt, y, phi=0.5, psi=0.0), ((zs - 0.5 * zt) ** 2).sum(1).mean())


@pytest.mark.parametrize("loss", [dkd, dist, continuation])
def test_label_smoothing_reaches_the_hard_term(loss, batch) -> None:  # noqa: ANN001
    zs, zt, y = batch
    extra = {"phi": 1.0, "psi": 1.0} if loss is continuation else {"temperature": 2.0}
    plain, smooth = loss(zs, zt, y, **extra), loss(zs, zt, y, label_smoothing=0.2, **extra)
    hard = F.cross_entropy(zs, y, label_smoothing=0.2) - F.cross_entropy(zs, y)
    weight = 1.0  # every hard term has weight 1 at these settings
    torch.testing.assert_close(smooth - plain, weight * hard)


def test_stacked_kd_defaults_to_raw_logits(batch) -> None:  # noqa: ANN001
    zs, zt, y = batch
    stacked = zs.unsqueeze(0).repeat(2, 1, 1)
    ones = torch.ones(2)
    raw = hinton_kd(stacked, zt, y, temperature=ones, alpha=ones, label_smoothing=0 * ones)
    standardized = hinton_kd(
        stacked, zt, y, temperature=ones, alpha=ones, label_smoothing=0 * ones, standardize=True
    )
    assert not torch.allclose(raw, standardized)


def test_standardize_divides_by_std_plus_eps() -> None:
    z = torch.tensor([[1.0, 1.0, 1.0]])  # std 0: only eps keeps it finite and positive
    assert torch.equal(standardize(z), torch.zeros_like(z))
    w = torch.tensor([[0.0, 2.0]])
    std = w.std(dim=1, keepdim=True)
    out = standardize(w)
    assert out[0, 1] < 1 / std.item() * 1.0 + 1e-12 and out[0, 1] > 0  # (2 - 1) / (std + eps) < 1 / std


def test_interpolate_boundaries() -> None:
    assert interpolate("linear", 0, 1, 4.0, 1.0) == 4.0  # one epoch: the start value
    assert interpolate("linear", 1, 2, 4.0, 1.0) == 1.0  # two epochs: start, then end
    assert interpolate("linear", 5, 3, 4.0, 1.0) == 1.0  # past the end: stays at the end
    assert [interpolate("step", e, 8, 0.0, 3.0) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # 4 steps
    assert interpolate("step", 8, 8, 0.0, 3.0) == 3.0  # clamped to the last level
    assert [interpolate("step", e, 4, 0.0, 1.0, steps=1) for e in range(4)] == [0.0] * 4
    assert [interpolate("step", e, 4, 0.0, 1.0, steps=2) for e in range(4)] == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule kind 'wavy'"):
        interpolate("wavy", 0, 4, 1.0, 2.0)


def test_step_lr_and_continuation_steps_use_whole_epochs() -> None:
    cfg = OptimConfig(epochs=7, lr=1.0, schedule="step")  # 7 // 2 = 3, 21 // 4 = 5
    assert [round(lr_at(e, cfg), 6) for e in range(7)] == [1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    assert [step_temperature(e, 7, 2) for e in range(7)] == [2, 2, 2, 1, 1, 1, 1]  # k = 3


def test_positions_of_names_missing_ids() -> None:
    dataset = torch.tensor([10, 30, 20])
    assert positions_of(torch.tensor([20, 10]), dataset).tolist() == [2, 0]
    with pytest.raises(KDError) as err:
        positions_of(torch.tensor([20, 99, 98]), dataset)  # 99 is past every id: no IndexError
    assert str(err.value) == (
        "2 cached sample ids are not in the dataset (first: 99): "
        "the cache was made on other data; re-run `kd teacher-logits`"
    )


def test_in_memory_batches_follow_the_generator() -> None:
    split = Split("d", "train", torch.arange(10.0).unsqueeze(1), torch.arange(10) % 2, torch.arange(10), 2)
    logits = torch.randn(10, 2)
    batches = InMemoryBatches(split, torch.arange(10), logits, 4, torch.device("cpu"))
    first = [b.labels.tolist() for b in batches.epoch(torch.Generator().manual_seed(5))]
    again = [b for b in batches.epoch(torch.Generator().manual_seed(5))]
    assert first == [b.labels.tolist() for b in again] and sum(len(x) for x in first) == 10
    assert all(torch.equal(b.teacher_logits, logits[b.inputs[:, 0].long()]) for b in again)


def test_shard_digest_is_crc32c_big_endian() -> None:
    import google_crc32c

    logits, labels, ids = np.ones((2, 3), np.float16), np.arange(2), np.arange(2) + 7
    raw = logits.tobytes() + labels.tobytes() + ids.tobytes()
    assert shard_digest(logits, labels, ids) == google_crc32c.value(raw).to_bytes(4, "big")


def test_summarize() -> None:
    assert summarize([3]) == "1 shard (3)"
    assert summarize([1, 2]) == "2 shards (1, 2)"
    assert summarize(list(range(8))) == "8 shards (0, 1, 2, 3, 4, 5, 6, 7)"
    assert summarize(list(range(9))) == "9 shards (0, 1, 2, 3, 4, 5, 6, 7, ...)"


def _store(tmp_path, finish: bool = True) -> LogitStore:  # noqa: ANN001
    store = LogitStore.create(tmp_path / "c.zarr", make_manifest())
    logits = torch.randn(N, C)
    writer = ShardWriter(store)
    writer.add(logits, logits.argmax(1), torch.arange(N))
    writer.close()
    if finish:
        store.finish()
    return store


RESUME = "re-run `kd teacher-logits` with the same preset: it resumes, writing only those shards"


def test_verify_messages_for_unfinished_stores(tmp_path) -> None:  # noqa: ANN001
    store = _store(tmp_path, finish=False)
    assert store.verify() == [
        "every shard is written but the manifest is not marked complete: re-run `kd teacher-logits`"
    ]
    zarr.open_group(store.where, mode="r+")["done"][1:] = False
    assert LogitStore.open(store.where).verify() == ["2 shards (1, 2) of 3 are not written", RESUME]


def test_verify_messages_for_damaged_records(tmp_path) -> None:  # noqa: ANN001
    store = _store(tmp_path)
    (tmp_path / "c.zarr" / "done" / "c" / "1").write_bytes(b"garbage")
    assert LogitStore.open(store.where).verify() == [
        "the 'done' record of 1 shard (1) cannot be read (damaged file)",
        RESUME,
    ]
    store = _store(tmp_path / "b")
    (tmp_path / "b" / "c.zarr" / "stats" / "c" / "2" / "0").write_bytes(b"garbage")
    zarr.open_group(store.where, mode="r+")["done"][0] = False
    assert LogitStore.open(store.where).verify() == [
        "the 'stats' record of 1 shard (2) cannot be read (damaged file)",
        "1 shard (0) of 3 are not written",
        RESUME,
    ]


def test_verify_reads_on_after_a_bad_shard(tmp_path) -> None:  # noqa: ANN001
    store = _store(tmp_path)
    (tmp_path / "c.zarr" / "logits" / "c" / "0" / "0").write_bytes(b"not zstd")
    group = zarr.open_group(store.where, mode="r+")
    group["crc32c"][2] = np.zeros(4, np.uint8)  # shard 2's record no longer matches the manifest
    problems = LogitStore.open(store.where).verify()
    assert problems[0].startswith("shard 0 (rows 0-8) cannot be read: ")
    assert "shard 2 (rows 16-21): its crc32c record disagrees with the manifest's checksum" in problems
    assert not any("labels disagree" in p for p in problems[1:])  # shard 0 is not counted as wrong


def test_verify_names_the_shards_that_repeat_ids(tmp_path) -> None:  # noqa: ANN001
    store = _store(tmp_path)
    ids = np.arange(N)
    ids[17] = 2  # shard 2 repeats an id of shard 0
    a, b = store.shard_range(2)
    store.write_shard(2, store.read("logits", a, b), store.read("labels", a, b), ids[a:b])
    store.group.attrs.put(dataclasses.replace(store.manifest, shard_crc32c=store.shard_checksums()).to_dict())
    problems = LogitStore.open(store.where).verify()
    assert problems == ["sample ids repeat in 1 shard (2): rows would join the wrong inputs"]


def test_verify_accuracy_tolerance(tmp_path) -> None:  # noqa: ANN001
    store = _store(tmp_path)  # accuracy 1.0 recorded; 21 rows: one wrong label moves it by 1/21 > 0.005
    recorded = dataclasses.replace(store.manifest, teacher_accuracy=0.996)
    store.group.attrs.put(recorded.to_dict())
    assert LogitStore.open(store.where).verify() == []  # within the tolerance (float16 ties): fine
    store.group.attrs.put(dataclasses.replace(recorded, teacher_accuracy=20 / 21).to_dict())
    assert LogitStore.open(store.where).verify() == [
        "labels disagree with the manifest: teacher accuracy from the stored logits is 1.0000, "
        "the manifest says 0.9524"
    ]


def test_a_run_folder_of_another_method_names_the_method_first(tmp_path) -> None:
    """The refusal lists the method change before the settings that follow from it (alpha, T, ...)."""
    import json

    from pipeline.config import resolve
    from pipeline.runs.identity import check_run_folder

    ce = resolve("tiny", {"distill.method": "ce"})
    (tmp_path / "config.json").write_text(json.dumps({"preset": ce.to_dict()}))
    with pytest.raises(KDError, match=r"other settings \(distill\.method: 'ce' -> 'kd', "):
        check_run_folder(tmp_path, resolve("tiny"))
