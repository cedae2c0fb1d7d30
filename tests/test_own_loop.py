"""The public API: `pipeline.open_cache` and `Cache` (check, targets, stream), the adapters for a plain
PyTorch loop and Hugging Face `Trainer`, and the README's "Your own training loop" snippet run as written."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.config import Paths, load_preset
from pipeline.data.datasets import load_split
from pipeline.distill.losses import hinton_kd, skew_kl
from pipeline.distill.targets import SparseTargets
from pipeline.errors import KDError
from pipeline.store import LogitStore, ShardWriter
from pipeline.store.encoding import decode_logits
from tests import cli_process
from tests.conftest import cache_paths, lm_cache, view_cache
from tests.test_readme_examples import example
from tests.test_store import make_manifest

README = Path(__file__).resolve().parents[1] / "README.md"


def stored(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """(logits, labels, {sample id: row}) of a cache as the store reads it."""
    logits, labels, ids = LogitStore.open(path).read_all()
    return logits, labels, {int(i): row for row, i in enumerate(ids)}


def rows_of(index: dict[int, int], ids: torch.Tensor) -> list[int]:
    return [index[int(i)] for i in ids]


@pytest.mark.parametrize("budget", [2048, 0])  # held whole, or read shard by shard
def test_targets_are_the_stored_logits_in_the_ids_order(tiny_data: Paths, budget: int) -> None:
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train, memory_budget_mb=budget)
    assert cache.fits_in_memory == (budget > 0) and cache.layout == "dense" and len(cache) == 800
    logits, _, index = stored(train)
    ids = torch.tensor([799, 0, 5, 256, 5, 511, 300])  # across shards, one twice
    got = cache.targets(ids)
    assert got.dtype == torch.float32 and torch.equal(got, logits[rows_of(index, ids)])
    assert torch.equal(cache.targets(ids.numpy()), got) and torch.equal(cache.targets(ids.tolist()), got)
    assert cache.targets(ids, device="cpu").device.type == "cpu"


def test_stream_serves_every_row_once_and_ranks_share_the_shards(tiny_data: Paths) -> None:
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train)
    logits, _, index = stored(train)
    batches = list(cache.stream(batch_size=100, seed=1, epoch=0))
    ids = torch.cat([b for b, _ in batches])
    assert [len(b) for b, _ in batches] == [100] * 8 and sorted(ids.tolist()) == sorted(index)
    assert all(torch.equal(t, logits[rows_of(index, b)]) for b, t in batches)
    again = torch.cat([b for b, _ in cache.stream(batch_size=100, seed=1, epoch=0)])
    other = torch.cat([b for b, _ in cache.stream(batch_size=100, seed=1, epoch=1)])
    assert torch.equal(again, ids) and not torch.equal(other, ids)  # the order is (seed, epoch)'s
    shares = [[b for b, _ in cache.stream(batch_size=100, seed=1, rank=r, world_size=2)] for r in range(2)]
    assert len(shares[0]) == len(shares[1]) and all(len(b) == 50 for share in shares for b in share)
    seen = [set(torch.cat(share).tolist()) for share in shares]
    assert not seen[0] & seen[1]  # each rank reads its own shards


def test_stream_refuses_what_would_serve_nothing(tiny_data: Paths) -> None:
    """Arguments a loop could get wrong are one KDError each, not an empty epoch or an IndexError: more
    processes than shards (a rank would get no rows), a rank outside the world, a batch of 0 rows, a
    batch that does not split evenly across the processes."""
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train)
    shards = LogitStore.open(train).num_shards
    cases = {
        "fewer than the": dict(batch_size=100, rank=0, world_size=shards + 1),
        "is not one of the 2 processes": dict(batch_size=100, rank=2, world_size=2),
        "batch_size must be a whole number": dict(batch_size=0),
        "must be a multiple of world_size": dict(batch_size=101, rank=0, world_size=2),
    }
    for message, kwargs in cases.items():
        with pytest.raises(KDError, match=message):
            list(cache.stream(**kwargs))


def test_a_views_cache_gives_every_view_or_the_one_asked_for(views_data: Paths) -> None:
    path = view_cache(views_data)
    cache = pipeline.open_cache(path)
    store = LogitStore.open(path)
    logits, _, index = stored(path)
    params = torch.from_numpy(store.read_views())
    ids = torch.tensor([3, 700, 42])
    got = cache.targets(ids)
    assert isinstance(got, pipeline.ViewTargets) and got.logits.shape == (3, 3, 10)
    assert torch.equal(got.logits, logits[rows_of(index, ids)])
    assert torch.equal(got.params, params[rows_of(index, ids)])
    view = torch.tensor([2, 0, 1])
    one = cache.targets(ids, view=view)
    assert torch.equal(one.logits, got.logits[torch.arange(3), view])
    assert torch.equal(one.params, got.params[torch.arange(3), view])
    assert cache.augment.kind == "shift"
    with pytest.raises(KDError, match="one view index a row, each in 0..2"):
        cache.targets(ids, view=torch.tensor([0, 3, 1]))


def test_a_sparse_cache_gives_its_sparse_targets(lm_data: Paths) -> None:
    path = lm_cache(lm_data)
    store = LogitStore.open(path)
    values, _, ids_all, extras = store.read_everything()
    m = store.manifest
    whole = SparseTargets.from_arrays(values, extras, m.sparse, m.storage.dtype)
    index = {int(i): row for row, i in enumerate(ids_all)}
    ids = torch.tensor([10, 0, 200])
    for budget in (2048, 0):
        got = pipeline.open_cache(path, memory_budget_mb=budget).targets(ids)
        want = whole.rows(torch.tensor(rows_of(index, ids)), torch.device("cpu"))
        assert isinstance(got, SparseTargets) and got.vocab == m.sparse["vocab"]
        for name in ("values", "ids", "lse", "sampled_ids", "sampled_logits"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    streamed = list(pipeline.open_cache(path).stream(batch_size=50, seed=0))
    assert sum(len(b) for b, _ in streamed) == len(index)
    first_ids, first = streamed[0]
    want = whole.rows(torch.tensor(rows_of(index, first_ids)), torch.device("cpu"))
    assert torch.equal(first.values, want.values) and torch.equal(first.lse, want.lse)


def test_check_refuses_other_data_in_one_line(tiny_data: Paths) -> None:
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train)
    split = load_split(load_preset("tiny").dataset, "train")
    cache.check(split)  # kd's own data: the checks kd distill makes
    cache.check(ids=split.ids, labels=split.labels, num_classes=10, split_name="train")
    cache.check(ids=split.ids.flip(0), labels=split.labels.flip(0))  # any order, labels alike
    cases = {
        "sample id 12345 is not in cache": dict(ids=[3, 12345]),
        "sample ids 800, 801, 802, 803, 804 and 1 more are not": dict(ids=list(range(795, 806))),
        "labels differ from the cached ones (first at sample id": dict(
            ids=split.ids, labels=(split.labels + 1) % 10
        ),
        "has 10 classes, your data 5": dict(num_classes=5),
        "computed on other data (fingerprint": dict(fingerprint="00" * 32),
        "holds the 'train' split, not 'test'": dict(split_name="test"),
        "needs the ids the labels belong to": dict(labels=split.labels),
    }
    for message, kwargs in cases.items():
        with pytest.raises(KDError) as err:
            cache.check(**kwargs)
        assert message in str(err.value) and "\n" not in str(err.value)
    test = load_split(load_preset("tiny").dataset, "test")
    with pytest.raises(KDError, match="holds the 'train' split, not 'test'"):
        cache.check(test)
    with pytest.raises(KDError, match="sample id 5000 is not in cache"):
        cache.targets([5000])
    with pytest.raises(KDError, match="has no views"):
        cache.targets([1], view=[0])


def test_open_cache_refuses_incomplete_and_damaged_caches(tiny_data: Paths, tmp_path: Path) -> None:
    import shutil

    (train,) = cache_paths(tiny_data, "train")
    with pytest.raises(KDError, match="no logit cache at"):
        pipeline.open_cache(tmp_path / "nothing.zarr")
    half = tmp_path / "half.zarr"
    store = LogitStore.create(half, make_manifest())
    ShardWriter(store).close()
    with pytest.raises(KDError, match="is incomplete"):
        pipeline.open_cache(half)
    damaged = tmp_path / train.name
    shutil.copytree(train, damaged)
    shard = damaged / "logits" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for budget in (2048, 0):
        cache = pipeline.open_cache(damaged, memory_budget_mb=budget)
        with pytest.raises(KDError, match="shard 1|cannot be read"):
            cache.targets([300])  # row 300 is in shard 1


def test_open_cache_reads_zips_and_far_caches(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    (train,) = cache_paths(tiny_data, "train")
    logits, _, index = stored(train)
    ids = torch.tensor([1, 2, 700])
    from pipeline.remote import copy_cache

    copy_cache(train, tmp_path / "team.zip")
    copy_cache(train, f"{s3}/api/{train.name}")
    for location, budget in (
        (tmp_path / "team.zip", 2048),
        (f"file://{train}", 2048),
        (f"{s3}/api/{train.name}", 2048),  # read through a local copy
        (f"{s3}/api/{train.name}", 0),  # streamed lazily, shards kept locally
    ):
        cache = pipeline.open_cache(location, memory_budget_mb=budget, data_dir=tmp_path / "data")
        assert torch.equal(cache.targets(ids), logits[rows_of(index, ids)]), location
    assert list((tmp_path / "data" / "remote-cache").glob("*.zarr"))  # the read-through copy


def test_teacher_dataset_joins_any_dataset_by_id(tiny_data: Paths) -> None:
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train)
    logits, _, index = stored(train)
    split = load_split(load_preset("tiny").dataset, "train")
    rows = pipeline.TeacherDataset(
        torch.utils.data.TensorDataset(split.inputs, split.labels), cache, split.ids
    )
    x, y, teacher = rows[7]
    assert torch.equal(x, split.inputs[7]) and torch.equal(teacher, logits[index[int(split.ids[7])]])
    loader = torch.utils.data.DataLoader(rows, batch_size=64, num_workers=2)
    x, y, teacher = next(iter(loader))
    assert teacher.shape == (64, 10) and torch.equal(teacher, logits[rows_of(index, split.ids[:64])])

    class Dicts(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            return {"x": i}

    item = pipeline.TeacherDataset(Dicts(), cache, ids=[800 - 1, 0, 1])[0]
    assert item["x"] == 0 and torch.equal(item["teacher_logits"], logits[index[799]])
    with pytest.raises(KDError, match="sample id 5000 is not in cache"):
        pipeline.TeacherDataset(Dicts(), cache, ids=[0, 1, 5000])
    with pytest.raises(KDError, match="2 ids for a dataset of 3 items"):
        pipeline.TeacherDataset(Dicts(), cache, ids=[0, 1])


def tiny_classifier_cache(tmp_path: Path, n: int = 24) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A dense cache of 2-class logits for sample ids 100..100+n-1 (labels i % 2)."""
    manifest = make_manifest(n=n)
    manifest = dataclasses.replace(manifest, dataset=dataclasses.replace(manifest.dataset, num_classes=2))
    store = LogitStore.create(tmp_path / "two.zarr", manifest)
    logits, labels = torch.randn(n, 2) * 3, torch.arange(n) % 2
    writer = ShardWriter(store)
    writer.add(logits, labels, torch.arange(100, 100 + n))
    writer.close()
    store.finish()
    return tmp_path / "two.zarr", decode_logits(store.read("logits"), "float32"), labels


def test_kd_trainer_takes_the_teacher_side_the_collator_adds(tmp_path: Path) -> None:
    """Sequence classification: KDTrainer's loss is hinton_kd of the model's logits against the cached
    logits of the batch's kd_id rows, and the kd_id column survives Trainer's column removal."""
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    path, logits, labels = tiny_classifier_cache(tmp_path)
    cache = pipeline.open_cache(path)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(5, 50, (8,), generator=g).tolist(),
            "label": int(labels[i]),
            "kd_id": 100 + i,
        }
        for i in range(24)
    ]
    collator = pipeline.TeacherCollator(cache)
    batch = collator(rows[3:7])
    assert torch.equal(batch["teacher_logits"], logits[3:7]) and "kd_id" not in batch
    args = TrainingArguments(
        str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=8, save_strategy="no",
        report_to=[], use_cpu=True, learning_rate=1e-3,
    )  # fmt: skip
    trainer = pipeline.KDTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator,
        temperature=2.0, alpha=0.5,
    )  # fmt: skip
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k not in ("teacher_logits", "labels")}
    want = hinton_kd(model(**inputs).logits, logits[3:7], batch["labels"], temperature=2.0, alpha=0.5)
    assert torch.allclose(loss, want)
    result = trainer.train()  # the kd_id column reaches the collator (Trainer would drop it)
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    # evaluation: the model's own CE on the evaluation set, with or without a kd_id column (its row
    # numbers 0..7 are not sample ids of this cache: they are not looked up)
    held_out = [{**row, "kd_id": i} for i, row in enumerate(rows[:8])]
    model.eval()
    batch = pipeline.TeacherCollator(cache, teacher=False)(held_out)
    assert "kd_id" not in batch and "teacher_logits" not in batch
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    for evaluated in (held_out, [{k: v for k, v in row.items() if k != "kd_id"} for row in held_out]):
        metrics = trainer.evaluate(Dataset.from_list(evaluated))
        assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(KDError, match="needs its sample id in a 'kd_id' column"):
        collator([{"input_ids": [1, 2], "label": 0}])


def test_kd_trainer_distils_a_causal_lm_from_a_sparse_cache(lm_data: Paths) -> None:
    """Position i of an HF causal LM predicts token i + 1, as the cache's position i does: the loss is
    hinton_kd over positions 0..L-2 against the cached next tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    path = lm_cache(lm_data)
    cache = pipeline.open_cache(path)
    split = load_split(load_preset("tiny-lm").dataset, "train")
    ids = split.ids[:4]
    cached_labels = torch.from_numpy(cache.store.read("labels"))[cache.positions(ids)]
    assert torch.equal(split.inputs[:4, 1:], cached_labels[:, :-1])  # the cache's labels: next tokens
    rows = [
        {
            "input_ids": split.inputs[i].tolist(),
            "labels": split.inputs[i].tolist(),
            "kd_id": int(split.ids[i]),
        }
        for i in range(4)
    ]
    batch = pipeline.TeacherCollator(cache)(rows)
    config = GPT2Config(vocab_size=cache.num_classes, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    args = TrainingArguments("unused", report_to=[], use_cpu=True)
    for target in ("topk-tail", "topk", "sampled"):
        trainer = pipeline.KDTrainer(model=model, args=args, temperature=2.0, alpha=0.5, sparse_target=target)
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"]).logits
        teacher = cache.targets(ids)
        cut = SparseTargets(
            teacher.values[:, :-1], teacher.ids[:, :-1], teacher.lse[:, :-1], teacher.temperatures,
            teacher.vocab, teacher.sampled_ids[:, :-1], teacher.sampled_logits[:, :-1],
        )  # fmt: skip
        settings = {"temperature": 2.0, "alpha": 0.5, "target": target}
        want = hinton_kd(logits[:, :-1], cut, cached_labels[:, :-1], **settings)
        assert torch.allclose(loss, want), target


def test_import_pipeline_stays_light() -> None:
    code = "import sys, pipeline; pipeline.__version__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert {"open_cache", "Cache", "hinton_kd", "TeacherDataset", "KDTrainer"} <= set(dir(pipeline))
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


@pytest.mark.slow
def test_the_readme_own_loop_runs_as_written(tmp_path: Path) -> None:
    """After the demo's stage 1 (here its teacher trained for 2 epochs: the cache is what matters)."""
    env = {**os.environ, "KD_DATA_DIR": str(tmp_path / "data"), "TQDM_DISABLE": "1"}
    short = ["--preset", "mnist1d", "--set", "teacher.train.epochs=2"]
    assert cli_process.run(["train-teacher", *short], env).returncode == 0
    dumped = cli_process.run(["teacher-logits", *short, "--split", "train"], env)
    assert dumped.returncode == 0, dumped.stderr
    env.pop("KD_DATA_DIR")
    result = subprocess.run(
        [sys.executable, "-c", example("own-loop", "python")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "epoch 0: T 4", "epoch 1: T 3.25", "epoch 2: T 2.5", "epoch 3: T 1.75", "epoch 4: T 1"
    ]  # fmt: skip


def test_a_cache_goes_to_dataloader_workers_under_spawn(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    """A Cache pickles (spawn and forkserver workers get a copy): folder, zip and far caches, held whole
    or read shard by shard, give the same rows after the round trip; a spawned worker reads it."""
    import pickle

    from pipeline.remote import copy_cache

    (train,) = cache_paths(tiny_data, "train")
    logits, _, index = stored(train)
    ids = torch.tensor([3, 700, 256])
    copy_cache(train, tmp_path / "team.zip")
    copy_cache(train, f"{s3}/spawn/{train.name}")
    for location, budget in (
        (train, 2048),
        (train, 0),
        (tmp_path / "team.zip", 0),
        (f"{s3}/spawn/{train.name}", 2048),
        (f"{s3}/spawn/{train.name}", 0),  # streamed lazily through a local shard cache
    ):
        cache = pipeline.open_cache(location, memory_budget_mb=budget, data_dir=tmp_path / "data")
        cache.targets(ids[:1])
        copy = pickle.loads(pickle.dumps(cache))
        assert torch.equal(copy.targets(ids), logits[rows_of(index, ids)]), (location, budget)
    cache = pipeline.open_cache(tmp_path / "team.zip", memory_budget_mb=0)
    split = load_split(load_preset("tiny").dataset, "train")
    rows = pipeline.TeacherDataset(torch.utils.data.TensorDataset(split.labels), cache, split.ids)
    loader = torch.utils.data.DataLoader(rows, batch_size=50, num_workers=1, multiprocessing_context="spawn")
    _, teacher = next(iter(loader))
    assert torch.equal(teacher, logits[rows_of(index, split.ids[:50])])


def test_bad_ids_and_settings_are_one_line_errors(tiny_data: Paths) -> None:
    """What would be cut silently (float ids), read wrongly (2-D ids) or fail deep in torch (another
    class count, T = 0, alpha outside [0, 1]) is refused in one line naming it."""
    (train,) = cache_paths(tiny_data, "train")
    cache = pipeline.open_cache(train)
    with pytest.raises(KDError, match="sample ids must be whole numbers .* not float32"):
        cache.targets(torch.tensor([1.0, 2.7]))
    with pytest.raises(KDError, match="sample ids must be whole numbers .* not float64"):
        cache.targets([1.5])
    with pytest.raises(KDError, match=r"sample ids must be a 1-D sequence, one a row, not of shape \(2, 1\)"):
        cache.targets(torch.tensor([[1], [2]]))
    with pytest.raises(KDError, match="TeacherCollator: expected a Cache, not str"):
        pipeline.TeacherCollator(str(train), collator=list)
    with pytest.raises(KDError, match="TeacherDataset: expected a Cache"):
        pipeline.TeacherDataset([1, 2], str(train))
    student, teacher, labels = torch.randn(4, 10), cache.targets([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    refused = {
        "the student has 7 outputs but the teacher's logits have 10 classes": (
            student[:, :7],
            teacher,
            labels,
            {},
        ),
        r"teacher logits of shape \(3, 10\) for student logits of shape \(4, 10\)": (
            student,
            teacher[:3],
            labels,
            {},
        ),
        r"labels of shape \(4, 1\) for student logits of shape \(4, 10\)": (
            student,
            teacher,
            labels[:, None],
            {},
        ),
        "temperature must be a number > 0, not 0": (student, teacher, labels, {"temperature": 0}),
        "temperature must be a number > 0, not nan": (
            student,
            teacher,
            labels,
            {"temperature": float("nan")},
        ),
        r"alpha must be in \[0, 1\] \(the KD term's weight\), not 1.5": (
            student,
            teacher,
            labels,
            {"alpha": 1.5},
        ),
    }
    for message, (s, t, y, settings) in refused.items():
        with pytest.raises(KDError, match=f"hinton_kd: {message}"):
            hinton_kd(s, t, y, **{"temperature": 2.0, **settings})
    more = {
        "temperature must be a number > 0, not 0.0": (
            student,
            teacher,
            labels,
            {"temperature": torch.tensor(0.0)},
        ),
        "temperature must be a number > 0, not '2'": (student, teacher, labels, {"temperature": "2"}),
        r"alpha must be in \[0, 1\] .* not 1.5": (student, teacher, labels, {"alpha": torch.tensor(1.5)}),
        "needs alpha, or both ce_weight and kd_weight": (student, teacher, labels, {"alpha": None}),
        "the teacher must be its logits .* not a Cache": (student, cache, labels, {}),
        "the teacher must be its logits .* not a str": (student, str(train), labels, {}),
        "labels must be class indices \\(an integer tensor\\), not torch.float32": (
            student,
            teacher,
            labels.float(),
            {},
        ),
        r"labels must be class indices in 0..9 \(-100 where not scored\), not 12": (
            student,
            teacher,
            torch.tensor([0, 1, 2, 12]),
            {},
        ),
    }
    for message, (s, t, y, settings) in more.items():
        with pytest.raises(KDError, match=message):
            hinton_kd(s, t, y, **{"temperature": 2.0, **settings})
    assert pipeline.open_cache(cache) is cache  # already open
    collator = pipeline.TeacherCollator(cache, collator=lambda features: {"n": len(features)})
    for bad, message in (
        ([0.5, 1.7], "sample ids must be whole numbers .* not float64"),
        ([True, False], "sample ids must be whole numbers .* not bool"),
        ([[1, 2], [3, 4]], r"sample ids must be a 1-D sequence, one a row, not of shape \(2, 2\)"),
    ):
        with pytest.raises(KDError, match=message):
            collator([{"kd_id": i} for i in bad])
    with pytest.raises(KDError, match="skew_kl: temperature must be a number > 0"):
        skew_kl(student, teacher, labels, temperature=-1.0)
    from transformers import TrainingArguments

    args = TrainingArguments("unused", report_to=[], use_cpu=True)
    model = torch.nn.Linear(2, 2)
    for settings, message in (
        ({"temperature": 0.0}, "KDTrainer: temperature must be a number > 0"),
        ({"alpha": 1.5}, r"KDTrainer: alpha must be in \[0, 1\]"),
        ({"sparse_target": "dense"}, "KDTrainer: sparse_target must be one of topk-tail, topk, sampled"),
    ):
        with pytest.raises(KDError, match=message):
            pipeline.KDTrainer(model=model, args=args, **settings)
