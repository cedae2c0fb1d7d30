"""cache.layout = "topk" for classification: the sparse layout with one row per sample (README "Language
models": many-class teachers), rebuilt to full logits by the uniform tail for every method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Paths, load_preset, with_overrides
from pipeline.store import LogitStore
from pipeline.store.sparse import dense_from_topk, reduce_logits, sparse_record
from tests.conftest import VIEW_ARGS, VIEW_SETTINGS, cache_paths, view_cache
from tests.test_bad_inputs import assert_refused, run_kd, snapshot
from tests.test_cli import kd

TOPK = ["--set", "cache.layout=topk", "--set", "cache.topk=3"]


def test_the_rebuilt_logits_keep_the_kept_probabilities_and_the_tail_mass() -> None:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(6, 20, generator=g)
    labels = torch.randint(0, 20, (6,), generator=g)
    entry = sparse_record(4, [1.0], 0, 0, 0, 20)
    values, extras, stats = reduce_logits(z, labels, torch.arange(6), entry)
    assert values.shape == (6, 4) and extras["lse"].shape == (6, 1) and stats.shape == (6, 3)
    dense = dense_from_topk(values, {k: v.numpy() for k, v in extras.items()}, entry)
    p, q = torch.softmax(z, -1), torch.softmax(dense, -1)
    kept = extras["topk_ids"].long()
    torch.testing.assert_close(q.gather(1, kept), p.gather(1, kept), atol=1e-5, rtol=1e-4)
    missing = torch.ones_like(p, dtype=torch.bool).scatter_(1, kept, False)
    torch.testing.assert_close((q * missing).sum(1), (p * missing).sum(1), atol=1e-5, rtol=1e-4)
    assert torch.equal(dense.gather(1, kept), values)  # the kept logits are the stored raw values


@pytest.mark.slow
def test_a_top_k_classification_cache_trains_every_method(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    shutil.copytree(tiny_data.teachers, paths.teachers)
    result = kd(paths, "teacher-logits", "--preset", "tiny", *TOPK)
    assert result.exit_code == 0, result.output
    (train,) = cache_paths(paths, "train")
    store = LogitStore.open(train)
    assert store.manifest.layout == "sparse" and store.row_shape == (3,) and store.verify() == []
    (dense,) = cache_paths(tiny_data, "train")
    assert store.manifest.teacher_accuracy == pytest.approx(LogitStore.open(dense).manifest.teacher_accuracy)
    assert store.nbytes_stored(("logits", "topk_ids")) < LogitStore.open(dense).nbytes_stored(("logits",))
    for method in ("kd", "dkd", "dist"):
        args = ["--method", method, "--epochs", "3", "--set", "distill.dkd.warmup_epochs=1"]
        result = kd(paths, "distill", "--preset", "tiny", *TOPK, *args, "--run-name", method)
        assert result.exit_code == 0, result.output
        summary = json.loads((paths.runs / method / "summary.json").read_text())
        assert summary["cache"] == str(train) and summary["student_val_accuracy"] > 0.2


@pytest.mark.slow
def test_a_top_k_cache_of_views_keeps_each_views_top_k_and_round_trips(
    views_data: Paths, tmp_path: Path
) -> None:
    from stages import cache_interop

    paths = Paths(data=tmp_path / "data")
    shutil.copytree(views_data.teachers, paths.teachers)
    result = kd(paths, "teacher-logits", "--preset", "tiny", "--split", "train", *VIEW_ARGS, *TOPK)
    assert result.exit_code == 0, result.output
    (path,) = cache_paths(paths, "train")
    store, dense = LogitStore.open(path), LogitStore.open(view_cache(views_data))
    assert store.manifest.views == dense.manifest.views and store.row_shape == (3, 3)  # 3 views x top 3
    assert store.verify() == []
    values, labels, ids, extras = store.read_everything()
    full, _, dense_ids, _ = dense.read_everything()
    assert torch.equal(ids, dense_ids) and torch.equal(labels, dense.read_all()[1])
    np.testing.assert_array_equal(extras["views"], dense.read_views())  # the same replayable views
    kept = torch.from_numpy(extras["topk_ids"].astype(np.int64))
    assert torch.equal(full.gather(-1, kept), values)  # each view's own raw logits, as stored densely
    assert torch.equal(full.topk(3, dim=-1).values, values)  # and its 3 largest
    torch.testing.assert_close(
        torch.from_numpy(extras["lse"][..., 0]), torch.logsumexp(full, -1), atol=2e-2, rtol=0
    )  # the full row's logsumexp (from the float32 logits; the dense cache holds float16)
    assert store.manifest.teacher_accuracy == pytest.approx(dense.manifest.teacher_accuracy, abs=0.005)

    args = ["--preset", "tiny", *VIEW_ARGS, *TOPK, "--epochs", "3", "--run-name", "v", "--device", "cpu"]
    result = kd(paths, "distill", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "v" / "summary.json").read_text())
    assert summary["cache"] == str(path) and summary["student_val_accuracy"] > 0.2
    streamed = [*args[:-4], "--run-name", "s", "--device", "cpu", "--set", "distill.memory_budget_mb=0"]
    result = kd(paths, "distill", *streamed)
    assert result.exit_code == 0, result.output  # streamed shard by shard, rebuilt to every class per block
    assert json.loads((paths.runs / "s" / "config.json").read_text())["batches"].startswith("cache streamed")
    assert json.loads((paths.runs / "s" / "summary.json").read_text())["student_val_accuracy"] > 0.2
    config = json.loads((paths.runs / "v" / "config.json").read_text())
    assert (
        "top-3 cache of 10 classes: the missing logits are rebuilt by the uniform tail"
        in config["approximation"]
    )
    before = snapshot(paths.data)
    exact = run_kd(paths.data, "distill", *args[:-4], "--run-name", "e", "--set", "distill.sparse_exact=true")
    assert_refused(
        exact, "is a top-3 cache of 10 classes and distill.sparse_exact = true asks for exact targets"
    )
    assert snapshot(paths.data) == before

    out = cache_interop.export(path, tmp_path / "views.npz", "npz")
    preset = with_overrides(load_preset("tiny"), VIEW_SETTINGS)
    made = LogitStore.open(
        cache_interop.import_(out, preset, tmp_path / "root", split="train", teacher_name="tiny-cnn1d")
    )
    assert made.manifest.views == store.manifest.views and made.manifest.sparse == store.manifest.sparse
    again = made.read_everything()
    assert torch.equal(again[0], values) and torch.equal(again[2], ids)
    assert all(np.array_equal(again[3][name], extras[name]) for name in extras)
    assert made.verify() == [] and made.manifest.teacher_accuracy == store.manifest.teacher_accuracy
