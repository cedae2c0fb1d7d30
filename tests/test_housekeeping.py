"""kd cache rm / gc, and names that cannot leave the cache root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import zarr

from pipeline.config import Paths
from tests.conftest import cache_paths
from tests.test_cli import kd


def age(path: Path, hours: float) -> None:
    old = time.time() - hours * 3600
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (old, old))


def copy_caches(tiny_data: Paths, tmp_path: Path) -> Paths:
    paths = Paths(data=tmp_path)
    for split in ("train", "test"):
        (src,) = cache_paths(tiny_data, split)
        shutil.copytree(src, paths.logits / src.name)
    return paths


def test_rm_is_a_dry_run_until_yes_and_stays_in_the_root(tiny_data: Paths, tmp_path: Path) -> None:
    paths = copy_caches(tiny_data, tmp_path)
    (train,) = cache_paths(paths, "train")
    result = kd(paths, "cache", "rm", train.name)
    assert result.exit_code == 0 and "would remove" in result.stderr and train.exists()
    result = kd(paths, "cache", "rm", train.name, "--yes")
    assert result.exit_code == 0 and not train.exists() and cache_paths(paths, "test")
    for bad, why in (
        ("../teachers", "names cannot leave the cache root"),
        ("../../etc", "names cannot leave the cache root"),
        ("/etc", "names cannot leave the cache root"),
        ("nope.zarr", "no cache named 'nope.zarr'"),
    ):
        result = kd(paths, "cache", "rm", bad, "--yes")
        assert result.exit_code == 2 and why in " ".join(result.stderr.split()), bad
    assert "cannot leave the cache root" in kd(paths, "cache", "rm", "../x").stderr
    (tmp_path / "logits" / "notes").mkdir()
    result = kd(paths, "cache", "rm", "notes", "--yes")
    assert result.exit_code == 2 and "is not a logit cache: not removing it" in result.stderr
    assert (tmp_path / "logits" / "notes").exists()


def test_gc_collects_incomplete_and_orphaned_entries(tiny_data: Paths, tmp_path: Path) -> None:
    paths = copy_caches(tiny_data, tmp_path)
    (train,) = cache_paths(paths, "train")
    partial = paths.logits / ("partial-" + train.name)
    shutil.copytree(train, partial)
    zarr.open_group(partial, mode="r+")["done"][2] = False
    junk = paths.logits / "junk"
    junk.mkdir()
    (junk / "x").write_text("x")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = paths.logits / "other.zarr.lock"
    lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))
    fresh_partial = paths.logits / ("fresh-" + train.name)
    shutil.copytree(partial, fresh_partial)
    for p in (partial, junk, lock, train):
        age(p, 48)

    result = kd(paths, "cache", "gc", "--older-than", "24")
    assert result.exit_code == 0 and "dry run" in result.stderr
    listed = " ".join(result.stderr.split())
    assert f"would remove {partial}: incomplete (3/4 shards)" in listed
    assert f"would remove {lock}: lock of a writer that is gone" in listed
    assert f"left alone: {junk}: not a logit cache" in listed  # a user's folder is never collected
    assert str(fresh_partial) not in listed and str(train) + ":" not in listed  # too new / complete
    assert partial.exists()
    result = kd(paths, "cache", "gc", "--older-than", "24", "--yes")
    assert result.exit_code == 0
    assert not partial.exists() and not lock.exists()
    assert train.exists() and fresh_partial.exists() and (junk / "x").read_text() == "x"


def test_teacher_names_cannot_escape(tmp_path: Path) -> None:
    result = kd(
        Paths(data=tmp_path), "teacher-logits", "--preset", "tiny", "--set", "teacher.name=../../evil"
    )
    assert result.exit_code == 2 and "teacher.name '../../evil' is not allowed" in result.stderr
