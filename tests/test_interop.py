"""HDF5 / npz export and import round trips; imports are checked against the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import Paths
from pipeline.store import LogitStore
from tests.conftest import cache_paths
from tests.test_cli import kd


@pytest.mark.parametrize(("fmt", "suffix"), [("hdf5", ".h5"), ("npz", ".npz")])
def test_export_import_round_trip(tiny_data: Paths, tmp_path: Path, fmt: str, suffix: str) -> None:
    (train,) = cache_paths(tiny_data, "train")
    out = tmp_path / f"logits{suffix}"
    result = kd(tiny_data, "cache", "export", str(train), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    original = LogitStore.open(train)
    logits, labels, ids = original.read_all()
    if fmt == "hdf5":
        with h5py.File(out, "r") as f:  # readable by plain h5py, manifest included
            assert f["logits"].shape == (800, 10) and f["logits"].dtype == np.float16
            assert json.loads(f.attrs["manifest"])["teacher"]["name"] == "tiny-cnn1d"

    paths = Paths(data=tmp_path / "team")
    result = kd(
        paths,
        "cache",
        "import",
        str(out),
        "--preset",
        "tiny",
        "--split",
        "train",
        "--teacher-name",
        "from-file",
    )
    assert result.exit_code == 0, result.output
    (imported,) = cache_paths(paths, "train", teacher="from-file")
    store = LogitStore.open(imported)
    assert store.verify() == []
    got, got_labels, got_ids = store.read_all()
    assert torch.equal(got, logits) and torch.equal(got_labels, labels) and torch.equal(got_ids, ids)
    assert store.manifest.dataset.fingerprint == original.manifest.dataset.fingerprint
    assert store.manifest.teacher_accuracy == pytest.approx(original.manifest.teacher_accuracy)
    result = kd(paths, "distill", "--preset", "tiny", "--set", "teacher.name=from-file", "--epochs", "2")
    assert result.exit_code == 0, result.output


def test_foreign_hdf5_in_other_row_order_is_joined_by_id(tiny_data: Paths, tmp_path: Path) -> None:
    (train,) = cache_paths(tiny_data, "train")
    logits, labels, ids = LogitStore.open(train).read_all()
    perm = torch.randperm(len(ids))
    path = tmp_path / "theirs.h5"
    with h5py.File(path, "w") as f:  # a team's own file: float32, shuffled rows, no manifest
        f["logits"] = logits[perm].numpy()
        f["index"] = ids[perm].numpy()
        f["labels"] = labels[perm].numpy()
    paths = Paths(data=tmp_path / "team")
    result = kd(paths, "cache", "import", str(path), "--preset", "tiny", "--teacher-name", "theirs")
    assert result.exit_code == 0, result.output
    got, _, got_ids = LogitStore.open(cache_paths(paths, "train", teacher="theirs")[0]).read_all()
    assert torch.equal(got_ids, ids) and torch.equal(got, logits)


def test_import_refuses_other_data(tiny_data: Paths, tmp_path: Path) -> None:
    (train,) = cache_paths(tiny_data, "train")
    out = tmp_path / "l.npz"
    assert kd(tiny_data, "cache", "export", str(train), "--format", "npz", "--out", str(out)).exit_code == 0
    paths = Paths(data=tmp_path / "team")
    result = kd(paths, "cache", "import", str(out), "--preset", "tiny", "--set", "dataset.seed=7")
    assert result.exit_code == 2 and "labels disagree" in result.stderr
    result = kd(paths, "cache", "import", str(out), "--preset", "tiny", "--split", "test")
    assert result.exit_code == 2 and "holds 800 x 10 logits but mnist1d/test has 200 rows" in " ".join(
        result.stderr.split()
    )
    result = kd(paths, "cache", "import", str(tmp_path / "missing.h5"), "--preset", "tiny")
    assert result.exit_code == 2 and "no file at" in result.stderr


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("logits.npz", "npz"), ("logits.H5", "hdf5"), ("logits.hdf5", "hdf5"), ("logits", "hdf5")],
)
def test_export_writes_the_format_its_file_name_says(
    tiny_data: Paths, tmp_path: Path, name: str, fmt: str
) -> None:
    (train,) = cache_paths(tiny_data, "train")
    out = tmp_path / name
    result = kd(tiny_data, "cache", "export", str(train), "--out", str(out))  # no --format
    assert result.exit_code == 0, result.output
    magic = out.read_bytes()[:8]
    assert magic.startswith(b"PK") if fmt == "npz" else magic == b"\x89HDF\r\n\x1a\n"
