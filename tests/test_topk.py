"""cache.layout = "topk" for classification: the sparse layout with one row per sample (README "Language
models": many-class teachers), rebuilt to full logits by the uniform tail for every method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import Paths
from pipeline.store import LogitStore
from pipeline.store.sparse import dense_from_topk, reduce_logits, sparse_record
from tests.conftest import cache_paths
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


def test_top_k_with_views_is_one_line(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = run_kd(tmp_path, "teacher-logits", "--preset", "tiny", *TOPK, "--set", "cache.augment=shift")
    assert_refused(result, 'cache.layout = "topk" with augmented views (cache.augment) is not supported yet')
    assert snapshot(tmp_path) == before
