"""Stage 1 killed (-9) at several points resumes to a byte-identical store; one writer per cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Paths
from pipeline.errors import KDError
from pipeline.store import LogitStore, cache_lock
from tests import cli_process
from tests.conftest import cache_paths
from tests.test_cli import kd

ARRAYS = ("logits", "labels", "index", "stats", "crc32c", "done")


def dump(data: Path, *, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_DATA_DIR": str(data), "TQDM_DISABLE": "1"}
    env.pop("KD_FAULT_AFTER_SHARDS", None)
    if kill_after is not None:
        env["KD_FAULT_AFTER_SHARDS"] = str(kill_after)
    return cli_process.run(["teacher-logits", "--preset", "tiny", "--split", "train"], env)


def array_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for name in ARRAYS
        for p in sorted((store / name).rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_bytes(tiny_data: Paths, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(tiny_data.teachers, reference / "teachers")
    assert dump(reference).returncode == 0
    (expected_path,) = cache_paths(Paths(data=reference), "train")
    expected = array_files(expected_path)

    for kill_after in (1, 3):  # of the tiny train split's 4 shards
        data = tmp_path / f"killed-{kill_after}"
        shutil.copytree(tiny_data.teachers, data / "teachers")
        killed = dump(data, kill_after=kill_after)
        assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
        (path,) = cache_paths(Paths(data=data), "train")
        partial = LogitStore.open(path)
        assert not partial.manifest.complete and int(partial.shards_done().sum()) == kill_after
        with pytest.raises(KDError, match=f"incomplete \\({kill_after}/4 shards"):
            partial.require_complete()
        assert path.with_name(path.name + ".lock").exists()  # left behind by the dead writer

        finished = {  # the per-shard files of the shards done before the kill: resume must not rewrite them
            f: f.stat().st_mtime_ns
            for shard in range(kill_after)
            for f in (path / "done" / "c" / str(shard), path / "crc32c" / "c" / str(shard) / "0")
        }
        resumed = dump(data)
        assert resumed.returncode == 0, resumed.stderr
        assert {f: f.stat().st_mtime_ns for f in finished} == finished
        assert f"resuming {path}: {kill_after}/4 shards done" in " ".join(resumed.stderr.split())
        assert array_files(path) == expected  # every chunk of every array, byte for byte
        final = LogitStore.open(path)
        final.require_complete()
        reference_manifest = LogitStore.open(expected_path).manifest
        assert final.manifest.shard_crc32c == reference_manifest.shard_crc32c
        assert final.manifest.teacher_accuracy == reference_manifest.teacher_accuracy
        assert not path.with_name(path.name + ".lock").exists()


def hold_lock(path: Path) -> subprocess.Popen:
    """A live writer: another process holding the cache's lock until killed."""
    code = (
        "import sys, time; from pathlib import Path; from pipeline.store import cache_lock\n"
        "with cache_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_while_the_first_lives(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    shutil.copytree(tiny_data.teachers, paths.teachers)
    shutil.copytree(tiny_data.logits, paths.logits)
    (train,) = cache_paths(paths, "train")
    shutil.rmtree(train)  # force a dump of the train split
    lock = train.with_name(train.name + ".lock")
    writer = hold_lock(train)
    try:
        result = kd(paths, "teacher-logits", "--preset", "tiny", "--split", "train")
        assert result.exit_code == 2
        assert f"is being written by pid {writer.pid}" in " ".join(result.stderr.split())
        assert lock.exists() and not train.exists()  # nothing written, the other writer's lock kept
    finally:
        writer.kill()
        writer.wait()
    # the writer died (kill -9): its lock file stays, unheld, and is taken over
    assert lock.exists()
    result = kd(paths, "teacher-logits", "--preset", "tiny", "--split", "train")
    assert result.exit_code == 0, result.output
    LogitStore.open(train).require_complete()
    assert not lock.exists()


def test_lock_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    with cache_lock(path), pytest.raises(KDError, match="is being written by pid"), cache_lock(path):
        pass
    with cache_lock(path):  # released on exit
        pass


def damaged_copy(tiny_data: Paths, tmp_path: Path, how: str) -> Path:
    (train,) = cache_paths(tiny_data, "train")
    copy = tmp_path / train.name
    shutil.copytree(train, copy)
    shard_file = copy / "logits" / "c" / "0" / "0"  # the tiny train split's logits live in one shard file
    data = bytearray(shard_file.read_bytes())
    if how == "bit flip":
        data[len(data) // 3] ^= 0x10
        shard_file.write_bytes(bytes(data))
    else:
        shard_file.write_bytes(bytes(data[: len(data) // 2]))
    return copy


@pytest.mark.parametrize("how", ["bit flip", "truncated"])
def test_damaged_shard_is_found_by_verify_and_refused_by_distill(
    tiny_data: Paths, tmp_path: Path, how: str
) -> None:
    copy = damaged_copy(tiny_data, tmp_path, how)
    result = kd(tiny_data, "cache", "verify", str(copy))
    assert result.exit_code == 1
    assert "problem:" in result.stderr and "shard 0" in result.stderr
    result = kd(Paths(data=tmp_path / "empty"), "distill", "--preset", "tiny", "--cache", str(copy))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "shard 0" in result.stderr or "cannot be read" in result.stderr
    assert kd(tiny_data, "cache", "verify", str(cache_paths(tiny_data, "train")[0])).exit_code == 0
