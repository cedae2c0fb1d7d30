"""Caches on a real S3-protocol server (moto's standalone server on loopback) and in zip files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.config import Paths
from pipeline.store import LogitStore
from stages.cli import app
from tests.conftest import cache_paths
from tests.test_cli import kd, runner


def test_push_ls_info_pull_and_train_from_s3(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/{train.name}"
    result = kd(tiny_data, "cache", "push", str(train), url)
    assert result.exit_code == 0, result.output
    assert "ok:" in result.stderr  # verified after the copy, on the server

    listing = runner.invoke(app, ["cache", "ls", s3], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    assert train.name in listing.stdout and "tiny-cnn1d" in listing.stdout
    info = kd(tiny_data, "cache", "info", url, "--json")
    assert json.loads(info.stdout) == LogitStore.open(train).manifest.to_dict()

    pulled = tmp_path / "pulled.zarr"
    result = kd(tiny_data, "cache", "pull", url, str(pulled))
    assert result.exit_code == 0, result.output
    assert torch.equal(LogitStore.open(pulled).read_all()[0], LogitStore.open(train).read_all()[0])
    again = kd(tiny_data, "cache", "pull", url, str(pulled))
    assert again.exit_code == 2 and "already exists" in again.stderr

    paths = Paths(data=tmp_path / "elsewhere")  # no teacher, no local cache: only the bucket
    result = kd(
        paths, "distill", "--preset", "tiny", "--cache", url, "--epochs", "2", "--run-name", "from-s3"
    )
    assert result.exit_code == 0, result.output
    assert "fetching" in result.stderr
    local = list((paths.data / "remote-cache").iterdir())
    assert len(local) == 1 and LogitStore.open(local[0]).verify() == []
    result = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--epochs", "1")
    assert result.exit_code == 0 and "fetching" not in result.stderr  # read through the local copy


def test_a_remote_name_given_to_another_cache_is_fetched_again(
    tiny_data: Paths, tmp_path: Path, s3: str
) -> None:
    """kd's own read-through copy follows the remote's content key: when the team replaces the cache
    under a name (here float16 -> float32 logits), the next run fetches the new one (push --force
    would refuse; the team removed the old copy first)."""
    import fsspec

    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/team-train.zarr"
    assert kd(tiny_data, "cache", "push", str(train), url).exit_code == 0
    paths = Paths(data=tmp_path / "elsewhere")
    first = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--epochs", "1")
    assert first.exit_code == 0 and "fetching" in first.stderr, first.output

    other = Paths(data=tmp_path / "other")
    shutil.copytree(tiny_data.teachers, other.teachers)
    dumped = kd(
        other, "teacher-logits", "--preset", "tiny", "--split", "train", "--set", "cache.dtype=float32"
    )
    assert dumped.exit_code == 0, dumped.output
    (wide,) = cache_paths(other, "train")
    refused = kd(other, "cache", "push", str(wide), url, "--force")
    assert refused.exit_code == 2 and "not a copy of" in refused.stderr, refused.output
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)
    assert kd(other, "cache", "push", str(wide), url).exit_code == 0

    again = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--epochs", "1", "--run-name", "new")
    assert again.exit_code == 0 and "fetching" in again.stderr, again.output  # (another cache: a new run)
    (local,) = (paths.data / "remote-cache").glob("*team-train.zarr")
    assert LogitStore.open(local).manifest.storage.dtype == "float32"


def test_damaged_remote_copy_is_refused(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    import fsspec

    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/damaged-{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).exit_code == 0
    fs, root = fsspec.core.url_to_fs(url)
    shard = f"{root}/logits/c/0/0"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 3] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    assert kd(tiny_data, "cache", "verify", url).exit_code == 1
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny", "--cache", url)
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "fails its CRC32C checksum" in message or "cannot be read" in message, message


def test_zip_round_trip(tiny_data: Paths, tmp_path: Path) -> None:
    (train,) = cache_paths(tiny_data, "train")
    archive = tmp_path / "shared" / "train.zip"
    result = kd(tiny_data, "cache", "push", str(train), str(archive))
    assert result.exit_code == 0, result.output
    assert LogitStore.open(archive).verify() == []
    result = kd(
        Paths(data=tmp_path / "x"), "distill", "--preset", "tiny", "--cache", str(archive), "--epochs", "1"
    )
    assert result.exit_code == 0, result.output


def test_a_team_shares_a_remote_cache_root(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    """KD_CACHE_DIR=s3://...: stage 1 writes there (verified push); a colleague without the teacher or
    any local file trains from it, found by teacher name and dataset."""
    import shutil

    root = f"{s3}/team-root"
    writer = Paths(data=tmp_path / "alice", cache=root)
    shutil.copytree(tiny_data.teachers, writer.teachers)
    result = kd(writer, "--cache-dir", root, "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("pushed") == 2 and "(verified)" in result.stderr
    again = kd(writer, "--cache-dir", root, "teacher-logits", "--preset", "tiny")
    assert again.exit_code == 0 and again.stderr.count("cache hit (remote)") == 2

    reader = Paths(data=tmp_path / "bob", cache=root)
    result = kd(
        reader, "--cache-dir", root, "distill", "--preset", "tiny", "--epochs", "2", "--run-name", "bob"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((reader.runs / "bob" / "summary.json").read_text())
    assert summary["teacher"] == "tiny-cnn1d" and summary["teacher_test_accuracy"] is not None
    assert str(reader.logits) in summary["cache"]  # trained from the local read-through copy


def test_a_train_cache_shared_alone_still_reports_the_teachers_test_accuracy(
    tiny_data: Paths, tmp_path: Path
) -> None:
    """A train cache pushed (or pulled) without its test split: the teacher's test accuracy comes from
    the local test cache of the same teacher (it showed "-" in the run's table)."""
    from pipeline.config import load_preset
    from pipeline.distill.student_data import prepare

    (train,) = cache_paths(tiny_data, "train")
    (test,) = cache_paths(tiny_data, "test")
    shared = tmp_path / "share" / train.name
    shutil.copytree(train, shared)
    data = prepare(load_preset("tiny"), tiny_data, cache=shared, device=torch.device("cpu"))
    assert data.store is not None and data.store.where == str(shared)
    assert data.teacher_test_accuracy == LogitStore.open(test).manifest.teacher_accuracy
