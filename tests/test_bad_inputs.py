"""Bad input, as a user meets it: the real `kd` process, one line on stderr, exit code 2, no traceback,
and every byte already on disk unchanged. Each case sets up its own files, runs one command, and
compares a snapshot of the data folder before and after."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import Paths
from tests import cli_process
from tests.conftest import cache_paths
from tests.test_housekeeping import copy_caches as _caches


def run_kd(data: Path, *args: str) -> subprocess.CompletedProcess:
    """`kd ARGS` in its own process (a fork of a process that imported kd: tests/cli_process.py)."""
    env = {**os.environ, "KD_DATA_DIR": str(data), "TQDM_DISABLE": "1", "COLUMNS": "400"}
    env.pop("KD_CACHE_DIR", None)
    return cli_process.run(list(args), env)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (symlinks as their target), by content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert text in lines[0], lines[0]


def _npz(path: Path, **arrays: object) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _import(source: str) -> list[str]:
    return ["cache", "import", source, "--preset", "tiny", "--teacher-name", "elsewhere"]


# (name, setup(tiny_data, data dir) -> argv, expected text in the one error line)
Case = tuple[str, Callable[[Paths, Path], list[str]], str]


def push_onto_a_users_folder(tiny: Paths, data: Path) -> list[str]:
    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    mine = data / "shared" / "mine.zarr"  # a user's folder that happens to end in .zarr
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    return ["cache", "push", str(train), str(mine), "--force"]


def push_force_onto_another_cache(tiny: Paths, data: Path) -> list[str]:
    """--force replaces a copy of the same cache, not the team's train cache under a name given by hand."""
    from pipeline.remote import copy_cache

    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    (test,) = cache_paths(paths, "test")
    (data / "shared").mkdir()
    copy_cache(train, data / "shared" / "logits.zip")
    return ["cache", "push", str(test), str(data / "shared" / "logits.zip"), "--force"]


def pull_a_damaged_cache(tiny: Paths, data: Path) -> list[str]:
    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    shard = train / "logits" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x08
    shard.write_bytes(bytes(raw))
    (data / "team").mkdir()
    return ["cache", "pull", str(train), str(data / "team")]


def nonfinite_temperature(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)
    return ["distill", "--preset", "tiny", "--temperature", "inf"]


def nonfinite_lr(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)
    return ["distill", "--preset", "tiny", "--lr", "nan"]


def import_nan_logits(tiny: Paths, data: Path) -> list[str]:
    logits = np.random.default_rng(0).normal(size=(800, 10)).astype(np.float32)
    logits[[3, 700]] = np.nan
    logits[5, 2] = np.inf
    data.mkdir(parents=True, exist_ok=True)
    _npz(data / "x.npz", logits=logits)
    return _import(str(data / "x.npz"))


def import_without_logits(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    _npz(data / "x.npz", scores=np.zeros((800, 10), np.float32))
    return _import(str(data / "x.npz"))


def import_short_labels(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    _npz(data / "x.npz", logits=np.zeros((800, 10), np.float32), labels=np.zeros(799, np.int64))
    return _import(str(data / "x.npz"))


def import_bad_manifest(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    _npz(data / "x.npz", logits=np.zeros((800, 10), np.float32), manifest=np.array("{not json"))
    return _import(str(data / "x.npz"))


def import_object_array(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    with (data / "x.npz").open("wb") as f:
        np.savez(f, logits=np.array([{"a": 1}], dtype=object))  # needs pickle to read
    return _import(str(data / "x.npz"))


def export_onto_a_folder(tiny: Paths, data: Path) -> list[str]:
    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    (data / "out").mkdir()
    return ["cache", "export", str(train), "--out", str(data / "out")]


def export_format_unlike_its_name(tiny: Paths, data: Path) -> list[str]:
    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    return ["cache", "export", str(train), "--out", str(data / "logits.npz"), "--format", "hdf5"]


def non_utf8_preset(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    (data / "latin1.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    return ["distill", "--preset", str(data / "latin1.toml")]


def corrupt_zip(tiny: Paths, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    (data / "broken.zip").write_bytes(b"PK\x03\x04 this is not a zip file")
    return ["cache", "verify", str(data / "broken.zip")]


def nan_cache_with_valid_checksums(tiny: Paths, data: Path) -> list[str]:
    """NaN logits written by someone else's tool, checksums and manifest consistent: still refused."""
    from pipeline.store import LogitStore

    paths = _caches(tiny, data)
    (train,) = cache_paths(paths, "train")
    group = zarr.open_group(train, mode="r+")
    logits = group["logits"][:]
    logits[10] = np.nan
    group["logits"][:] = logits
    store = LogitStore.open(train, writable=True)
    for shard in range(store.num_shards):
        a, b = store.shard_range(shard)
        store.write_shard(shard, logits[a:b], group["labels"][a:b], group["index"][a:b])
    store.finish()
    return ["distill", "--preset", "tiny", "--epochs", "1"]


def rm_a_users_folder(tiny: Paths, data: Path) -> list[str]:
    paths = _caches(tiny, data)
    (paths.logits / "results.zarr").mkdir()
    (paths.logits / "results.zarr" / "table.csv").write_text("a,b\n")
    return ["cache", "rm", "results.zarr", "--yes"]


def run_name_of_another_run(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)
    first = run_kd(data, "distill", "--preset", "tiny", "--epochs", "1", "--run-name", "mine")
    assert first.returncode == 0, first.stderr
    return ["distill", "--preset", "tiny", "--epochs", "2", "--run-name", "mine"]


def same_run_from_another_cache(tiny: Paths, data: Path) -> list[str]:
    """The same settings learning from another cache (here float32 logits of the same teacher) would
    rewrite the first run's folder: the settings alone cannot tell them apart."""
    import shutil

    paths = _caches(tiny, data)
    (narrow,) = cache_paths(paths, "train")
    shutil.copytree(tiny.teachers, paths.teachers)
    dump = ["teacher-logits", "--preset", "tiny", "--split", "train", "--set", "cache.dtype=float32"]
    other = run_kd(data, *dump)
    assert other.returncode == 0, other.stderr
    (wide,) = [p for p in cache_paths(paths, "train") if p != narrow]
    first = run_kd(
        data, "distill", "--preset", "tiny", "--epochs", "1", "--run-name", "mine", "--cache", str(narrow)
    )
    assert first.returncode == 0, first.stderr
    return ["distill", "--preset", "tiny", "--epochs", "1", "--run-name", "mine", "--cache", str(wide)]


def annealing_shorter_than_tau_max(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)
    return [
        "distill",
        "--preset",
        "tiny",
        "--method",
        "annealing",
        "--set",
        "distill.annealing.phase1_epochs=3",
    ]


def continuation_shorter_than_t_max(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)
    return ["distill", "--preset", "tiny", "--method", "continuation", "--epochs", "3"]


def teacher_options_changed_under_the_same_name(tiny: Paths, data: Path) -> list[str]:
    _caches(tiny, data)  # caches of the tiny teacher (32 channels), its checkpoint absent
    return ["teacher-logits", "--preset", "tiny", "--set", 'teacher.model.options={"channels": 8}']


def stale_teacher_checkpoint(tiny: Paths, data: Path) -> list[str]:
    import shutil

    shutil.copytree(tiny.teachers, data / "teachers")
    return ["train-teacher", "--preset", "tiny", "--set", 'teacher.model.options={"channels": 8}']


CASES: list[Case] = [
    (push_onto_a_users_folder.__name__, push_onto_a_users_folder, "is not a logit cache: not replacing it"),
    (
        push_force_onto_another_cache.__name__,
        push_force_onto_another_cache,
        "holds the cache of teacher 'tiny-cnn1d' on mnist1d train, not a copy of",
    ),
    (pull_a_damaged_cache.__name__, pull_a_damaged_cache, "fails verification, not copied"),
    (nonfinite_temperature.__name__, nonfinite_temperature, "must be a finite number"),
    (nonfinite_lr.__name__, nonfinite_lr, "must be a finite number"),
    (import_nan_logits.__name__, import_nan_logits, "3 rows of logits hold NaN or Inf (rows 3, 5, 700)"),
    (import_without_logits.__name__, import_without_logits, "has no 'logits' array"),
    (import_short_labels.__name__, import_short_labels, "'labels' must be 800 integers"),
    (import_bad_manifest.__name__, import_bad_manifest, "its 'manifest' is not valid JSON"),
    (import_object_array.__name__, import_object_array, "needs pickle"),
    (export_onto_a_folder.__name__, export_onto_a_folder, "is a folder: name the file to write"),
    (
        export_format_unlike_its_name.__name__,
        export_format_unlike_its_name,
        "logits.npz names an npz file but --format is hdf5: make them agree",
    ),
    (non_utf8_preset.__name__, non_utf8_preset, "is not UTF-8 text"),
    (corrupt_zip.__name__, corrupt_zip, "is not a readable zip file"),
    (nan_cache_with_valid_checksums.__name__, nan_cache_with_valid_checksums, "holds NaN or Inf logits"),
    (rm_a_users_folder.__name__, rm_a_users_folder, "is not a logit cache: not removing it"),
    (
        same_run_from_another_cache.__name__,
        same_run_from_another_cache,
        "holds a run of these settings from another cache",
    ),
    (run_name_of_another_run.__name__, run_name_of_another_run, "holds a run with other settings"),
    (
        teacher_options_changed_under_the_same_name.__name__,
        teacher_options_changed_under_the_same_name,
        "but the preset's teacher.model is cnn1d {'channels': 8}: retrain it with `kd train-teacher",
    ),
    (
        stale_teacher_checkpoint.__name__,
        stale_teacher_checkpoint,
        "teachers/tiny-cnn1d is teacher 'tiny-cnn1d' built as cnn1d {'channels': 32, 'dropout': 0.2}",
    ),
    (
        annealing_shorter_than_tau_max.__name__,
        annealing_shorter_than_tau_max,
        "annealing.phase1_epochs (3) must be at least annealing.tau_max (4)",
    ),
    (
        continuation_shorter_than_t_max.__name__,
        continuation_shorter_than_t_max,
        "continuation annealing epochs (3) must be at least continuation.t_max (4)",
    ),
]


@pytest.mark.parametrize("name, setup, text", CASES, ids=[c[0] for c in CASES])
def test_one_line_error_and_nothing_changed(
    name: str, setup: Callable[[Paths, Path], list[str]], text: str, tiny_data: Paths, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    argv = setup(tiny_data, data)
    before = snapshot(tmp_path)
    result = run_kd(data, *argv)
    assert_refused(result, text)
    assert snapshot(tmp_path) == before


def test_a_live_writers_cache_is_not_removed(tiny_data: Paths, tmp_path: Path) -> None:
    from tests.test_resume import hold_lock

    paths = _caches(tiny_data, tmp_path / "data")
    (train,) = cache_paths(paths, "train")
    writer = hold_lock(train)
    try:
        before = snapshot(tmp_path)
        result = run_kd(paths.data, "cache", "rm", train.name, "--yes")
        assert_refused(result, f"is being written by pid {writer.pid}")
        gc = run_kd(paths.data, "cache", "gc", "--older-than", "0", "--yes")
        assert gc.returncode == 0 and str(train) not in gc.stderr
        assert snapshot(tmp_path) == before
    finally:
        writer.kill()
        writer.wait()


def test_malformed_entries_are_skipped_with_a_warning(tiny_data: Paths, tmp_path: Path) -> None:
    """A *.zarr that is not our cache, a corrupt zip and a dangling link in the cache root: ls, gc and
    distill carry on, naming what they skipped; nothing of it is touched."""
    paths = _caches(tiny_data, tmp_path / "data")
    odd = paths.logits / "odd.zarr"
    zarr.open_group(odd, mode="w").attrs.put({"format": "something else"})
    (paths.logits / "broken.zip").write_bytes(b"not a zip")
    (paths.logits / "gone.zarr").symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path / "data" / "logits")
    ls = run_kd(paths.data, "cache", "ls")
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    assert "warning: skipping" in ls.stderr and "odd.zarr" in ls.stderr and "broken.zip" in ls.stderr
    assert "tiny-cnn1d" in ls.stdout
    gc = run_kd(paths.data, "cache", "gc", "--older-than", "0", "--yes")
    assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc.stderr
    assert f"left alone: {paths.logits / 'gone.zarr'}" in gc.stderr
    assert snapshot(tmp_path / "data" / "logits") == before
    distill = run_kd(paths.data, "distill", "--preset", "tiny", "--epochs", "1")
    assert distill.returncode == 0, distill.stderr
    assert "warning: skipping" in distill.stderr and "odd.zarr" in distill.stderr
    for path in paths.runs.rglob("*.json*"):  # strict JSON: NaN or Infinity would fail here
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            json.loads(line, parse_constant=lambda c, p=path: pytest.fail(f"{p} holds {c}"))


def test_a_zip_with_a_damaged_member_is_listed_and_described(tiny_data: Paths, tmp_path: Path) -> None:
    """ls and info read a zip's directory and manifest, not its chunks: a member failing its CRC is
    listed and described (verify finds it), never a traceback."""
    import struct
    import zipfile

    from pipeline.remote import copy_cache

    (train,) = cache_paths(tiny_data, "train")
    root = tmp_path / "team"
    root.mkdir()
    damaged = root / "team.zip"
    copy_cache(train, damaged)
    raw = bytearray(damaged.read_bytes())
    for member in zipfile.ZipFile(damaged).infolist():  # one flipped byte in every shard of logits
        if member.filename.startswith("logits/c/"):
            at = member.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[at + 26 : at + 30])
            raw[at + 30 + name_len + extra_len + member.compress_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    before = snapshot(tmp_path)

    ls = run_kd(tmp_path / "data", "cache", "ls", str(root))
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    assert "team.zip" in ls.stdout and "tiny-cnn1d" in ls.stdout
    info = run_kd(tmp_path / "data", "cache", "info", str(damaged))
    assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
    verify = run_kd(tmp_path / "data", "cache", "verify", str(damaged))
    assert verify.returncode == 1 and "Bad CRC-32" in verify.stdout + verify.stderr, verify.stderr
    assert "labels disagree" not in verify.stdout + verify.stderr  # no knock-on of the unread shards
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("argv", [["bench", "--device", "cuda"], ["distill", "--device", "cuda:0"]])
def test_asking_for_a_gpu_without_one(argv: list[str], tmp_path: Path) -> None:
    result = run_kd(tmp_path / "data", *argv)
    assert_refused(result, "but this machine has no usable CUDA GPU: use auto or cpu")
    assert not (tmp_path / "data").exists()


def test_an_unknown_device_name(tmp_path: Path) -> None:
    assert_refused(run_kd(tmp_path / "data", "distill", "--device", "gpu"), "unknown device 'gpu'")
