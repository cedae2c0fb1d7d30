"""A far cache never blocks its team: interrupted uploads are finished or collected, damaged local copies
of far data heal (on a real S3-protocol server, moto's, on loopback; each command its own process)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.config import Paths
from pipeline.remote import UPLOAD_RECORD
from pipeline.store import LogitStore
from tests import cli_process
from tests.conftest import cache_paths

NOTE = b"the team's notes: not a cache"


def kd(paths: Paths, *args: str, **env: str):
    """`kd --data-dir DATA ARGS` in its own process (exit code, stdout, stderr)."""
    environ = {**os.environ, "TQDM_DISABLE": "1", **env}
    if "KD_FAULT_AFTER_UPLOADS" not in env:
        environ.pop("KD_FAULT_AFTER_UPLOADS", None)
    return cli_process.run(["--data-dir", str(paths.data), *args], environ)


def one_error(result, *texts: str) -> str:
    """The run failed with exit 2 and one error line (no traceback) holding every text."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    flat = " ".join(result.stderr.split())
    for text in texts:
        assert text in flat, result.stderr
    return flat


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def server(url: str):
    """The S3 filesystem and the path of `url`, seeing the server as it is now (no cached listing)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, root


def exists(fs, path: str) -> bool:
    fs.invalidate_cache()
    return bool(fs.exists(path))


def objects(url: str) -> dict[str, bytes]:
    fs, root = server(url)
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def upload_all_but_the_manifest(src: Path, url: str) -> None:
    """What an interrupted upload by an earlier kd leaves: every object but the group metadata, no record."""
    fs, root = server(url)
    for path in sorted(
        p for p in src.rglob("*") if p.is_file() and p.relative_to(src).as_posix() != "zarr.json"
    ):
        fs.put_file(str(path), f"{root}/{path.relative_to(src).as_posix()}")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["first-object", "half-way", "all-but-the-manifest", "by-an-earlier-kd"])
def test_an_interrupted_push_is_finished_by_a_plain_push(
    tiny_data: Paths, tmp_path: Path, s3: str, moment: str
) -> None:
    (train,) = cache_paths(tiny_data, "train")
    prefix = f"{s3}/interrupted-{moment}"
    fs, root = server(prefix)
    fs.pipe(f"{root}/NOTES.txt", NOTE)
    url = f"{prefix}/{train.name}"
    uploads = len([p for p in train.rglob("*") if p.is_file()]) - 1  # every object but zarr.json
    if moment == "by-an-earlier-kd":
        upload_all_but_the_manifest(train, url)
    else:
        kill = {"first-object": 1, "half-way": uploads // 2, "all-but-the-manifest": uploads}[moment]
        killed = kd(tiny_data, "cache", "push", str(train), prefix, KD_FAULT_AFTER_UPLOADS=str(kill))
        assert killed.returncode == -9, killed.stderr  # SIGKILL, as kill -9
        assert len(objects(url)) == kill + 1  # the objects up, and the upload's record
    assert not exists(fs, f"{root}/{train.name}/zarr.json")

    listed = kd(tiny_data, "cache", "ls", prefix)
    assert listed.returncode == 0, listed.stderr
    flat = " ".join(listed.stdout.split())
    assert f"{url}: an interrupted upload" in flat and "no manifest" in flat, listed.stdout
    source = "CACHE" if moment == "by-an-earlier-kd" else str(train)
    assert f"finish it: kd cache push {source} {url}" in flat
    assert f"remove it: kd cache gc --root {prefix} --older-than 0 --yes" in flat
    refused = kd(tiny_data, "cache", "pull", url, str(tmp_path / "half.zarr"))
    one_error(refused, "an interrupted upload", f"kd cache push {source} {url}")

    pushed = kd(tiny_data, "cache", "push", str(train), prefix)  # no --force: these are its own remains
    assert pushed.returncode == 0, pushed.stderr
    assert "ok:" in pushed.stderr  # the copy verified on the server
    assert not exists(fs, f"{root}/{train.name}/{UPLOAD_RECORD}")
    pulled = tmp_path / "pulled.zarr"
    assert kd(tiny_data, "cache", "pull", url, str(pulled)).returncode == 0
    assert files(pulled) == files(train)  # byte for byte
    assert fs.cat_file(f"{root}/NOTES.txt") == NOTE


@pytest.mark.slow
def test_gc_on_a_url_removes_interrupted_uploads_and_nothing_else(tiny_data: Paths, s3: str) -> None:
    train, test = cache_paths(tiny_data, "train")[0], cache_paths(tiny_data, "test")[0]
    prefix = f"{s3}/gc"
    fs, root = server(prefix)
    fs.pipe(f"{root}/NOTES.txt", NOTE)
    assert kd(tiny_data, "cache", "push", str(test), prefix).returncode == 0  # a complete cache: kept
    complete = objects(f"{prefix}/{test.name}")
    killed = kd(tiny_data, "cache", "push", str(train), prefix, KD_FAULT_AFTER_UPLOADS="5")
    assert killed.returncode == -9
    remains = f"{prefix}/{train.name}"

    young = kd(tiny_data, "cache", "gc", "--root", prefix, "--older-than", "1")
    assert young.returncode == 0 and f"nothing to collect in {prefix} (older than 1 h)" in young.stderr
    dry = kd(tiny_data, "cache", "gc", "--root", prefix, "--older-than", "0")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {remains}: an interrupted upload (5 objects" in " ".join(dry.stderr.split())
    assert "dry run" in dry.stderr and len(objects(remains)) == 6
    done = kd(tiny_data, "cache", "gc", "--root", prefix, "--older-than", "0", "--yes")
    assert done.returncode == 0 and f"removed {remains}" in done.stderr, done.stderr
    assert not exists(fs, f"{root}/{train.name}")
    assert objects(f"{prefix}/{test.name}") == complete and fs.cat_file(f"{root}/NOTES.txt") == NOTE
    again = kd(tiny_data, "cache", "gc", "--root", prefix, "--older-than", "0")
    assert f"nothing to collect in {prefix} (older than 0 h)" in again.stderr
    assert kd(tiny_data, "cache", "verify", f"{prefix}/{test.name}").returncode == 0


@pytest.mark.slow
def test_the_remains_of_another_caches_upload_are_never_replaced(tiny_data: Paths, s3: str) -> None:
    train, test = cache_paths(tiny_data, "train")[0], cache_paths(tiny_data, "test")[0]
    url = f"{s3}/taken/team.zarr"
    killed = kd(tiny_data, "cache", "push", str(test), url, KD_FAULT_AFTER_UPLOADS="3")
    assert killed.returncode == -9
    before = objects(url)
    for force in ([], ["--force"]):
        refused = kd(tiny_data, "cache", "push", str(train), url, *force)
        one_error(refused, "an interrupted upload", "of another cache", "kd cache gc --root")
        assert objects(url) == before


def test_an_empty_prefix_is_no_disk_problem(tiny_data: Paths, s3: str) -> None:
    empty = f"{s3}/nothing-here"
    listed = kd(tiny_data, "cache", "ls", empty)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == f"no logit caches in {empty} (nothing under this prefix)"
    assert "free space" not in listed.stdout + listed.stderr
    collected = kd(tiny_data, "cache", "gc", "--root", empty)
    assert collected.returncode == 0 and f"nothing to collect in {empty}" in collected.stderr


@pytest.mark.slow
def test_two_pushes_of_one_cache_at_once_leave_one_verified_copy(tiny_data: Paths, s3: str) -> None:
    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/together/{train.name}"
    kd(tiny_data, "--version")  # the fork server is up before the two threads ask it
    results: list = [None, None]

    def push(i: int) -> None:
        results[i] = kd(tiny_data, "cache", "push", str(train), url)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    assert codes in ([0, 0], [0, 2]), [r.stderr for r in results]
    for r in results:  # the second may find the first one's copy already published
        assert r.returncode == 0 or "already exists" in r.stderr, r.stderr
    assert kd(tiny_data, "cache", "verify", url).returncode == 0
    fs, root = server(url)
    assert not exists(fs, f"{root}/{UPLOAD_RECORD}")
    assert objects(url) == files(train)


def metrics(paths: Paths, run: str) -> list[dict]:
    """Each epoch's record, less its wall time."""
    lines = (paths.runs / run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


STREAM = ("--epochs", "2", "--set", "distill.memory_budget_mb=0")


@pytest.fixture(scope="module")
def streamed(tiny_data: Paths, tmp_path_factory: pytest.TempPathFactory, s3: str) -> tuple[Paths, str]:
    """The tiny train cache pushed to the server and streamed once (its shards kept locally), and a
    streamed run of the same settings from the local cache, named "near-heal"."""
    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/streamed/{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).returncode == 0
    paths = Paths(data=tmp_path_factory.mktemp("far"))
    assert (
        kd(paths, "distill", "--preset", "tiny", "--cache", url, "--run-name", "first", *STREAM).returncode
        == 0
    )
    near = kd(
        tiny_data, "distill", "--preset", "tiny", "--cache", str(train), "--run-name", "near-heal", *STREAM
    )
    assert near.returncode == 0, near.stderr
    return paths, url


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", ["flip-shard-1", "cut-shard-2", "flip-records", "cut-records", "another-shard-0"]
)
def test_a_damaged_kept_shard_is_fetched_again(
    streamed: tuple[Paths, str], tiny_data: Paths, damage: str
) -> None:
    paths, url = streamed
    (folder,) = (paths.data / "remote-cache" / "shards").iterdir()
    sound = {p.name: p.read_bytes() for p in folder.glob("*.npz")}
    how, target = damage.split("-", 1)
    victim = folder / ("records.npz" if target == "records" else f"shard-{target.split('-')[-1]}.npz")
    if how == "another":  # a sound zip holding another shard's arrays: only the cache's CRC32C can tell
        victim.write_bytes(sound["shard-1.npz"])
    else:
        (flip_a_byte if how == "flip" else cut_in_half)(victim)
    run = f"healed-{damage}"
    result = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--run-name", run, *STREAM)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "fetching it again" in warnings[0], (
        result.stderr
    )
    assert metrics(paths, run) == metrics(tiny_data, "near-heal")  # as from the sound local cache
    assert {p.name: p.read_bytes() for p in folder.glob("*.npz")} == sound  # replaced by a sound copy


@pytest.mark.slow
def test_a_damaged_read_through_copy_is_fetched_again(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/small/{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).returncode == 0
    paths = Paths(data=tmp_path / "far")
    argv = ("distill", "--preset", "tiny", "--cache", url, "--epochs", "2")
    assert kd(paths, *argv, "--run-name", "first").returncode == 0
    (local,) = (paths.data / "remote-cache").glob("*.zarr")
    flip_a_byte(local / "logits" / "c" / "1" / "0")  # shard 1 of the kept copy
    healed = kd(paths, *argv, "--run-name", "healed")
    assert healed.returncode == 0, healed.stderr
    warnings = [line for line in " ".join(healed.stderr.split()).split("warning: ")[1:]]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "shard 1" in warnings[0], healed.stderr
    assert "fetching" in healed.stderr
    assert metrics(paths, "healed") == metrics(paths, "first")
    assert files(local) == files(train) and LogitStore.open(local).verify() == []


@pytest.mark.slow
def test_a_damaged_far_copy_is_an_error_naming_its_url(tiny_data: Paths, tmp_path: Path, s3: str) -> None:
    """Read through a whole local copy (it fits in memory): the far copy's damage is one line naming the
    far URL, and nothing damaged is kept as a sound copy."""
    (train,) = cache_paths(tiny_data, "train")
    url = f"{s3}/damaged/{train.name}"
    assert kd(tiny_data, "cache", "push", str(train), url).returncode == 0
    fs, root = server(url)
    fs.pipe(f"{root}/logits/c/0/0", fs.cat(f"{root}/logits/c/1/0"))  # shard 1's bytes under shard 0's name
    paths = Paths(data=tmp_path / "far")
    for _ in range(2):  # and again: the damaged local copy is not trusted the second time either
        result = kd(paths, "distill", "--preset", "tiny", "--cache", url, "--epochs", "1")
        one_error(result, f"the far cache {url} is damaged", "shard 0", f"kd cache push CACHE {url} --force")


def test_a_fetched_shard_is_kept_whole_or_not_at_all(tmp_path: Path) -> None:
    """ShardCache: a kept file cut short reads as absent (and is deleted), never as a short shard."""
    from pipeline.store.shard_cache import ShardCache

    cache = ShardCache(tmp_path, 10**6)
    arrays = {"logits": np.arange(40, dtype=np.float16).reshape(4, 10), "labels": np.arange(4)}
    cache.put(0, arrays)
    cut_in_half(cache.path(0))
    assert cache.get(0) is None and not cache.path(0).exists()
    cache.put(0, arrays)
    np.testing.assert_array_equal(cache.get(0)["logits"], arrays["logits"])  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_an_interrupted_copy_to_a_folder_or_zip_leaves_no_half_cache(
    tiny_data: Paths, tmp_path: Path, kind: str
) -> None:
    """Folders and zips are written under a temporary name and renamed: a push killed mid-way leaves
    that name only, which ls ignores, the next push does not mind and gc removes."""
    (train,) = cache_paths(tiny_data, "train")
    team = tmp_path / "team"
    dst = team / (f"{train.name}" if kind == "folder" else "team.zip")
    killed = kd(tiny_data, "cache", "push", str(train), str(dst), KD_FAULT_AFTER_UPLOADS="3")
    assert killed.returncode == -9
    (left,) = team.iterdir()
    assert ".kd-tmp-" in left.name and not dst.exists()
    listed = kd(tiny_data, "cache", "ls", str(team))
    assert listed.returncode == 0 and listed.stdout.startswith("no logit caches in"), listed.stdout
    pushed = kd(tiny_data, "cache", "push", str(train), str(dst))  # no --force needed
    assert pushed.returncode == 0 and "ok:" in pushed.stderr, pushed.stderr
    collected = kd(tiny_data, "cache", "gc", "--root", str(team), "--older-than", "0", "--yes")
    assert collected.returncode == 0 and f"removed {left}: an interrupted copy" in collected.stderr
    assert sorted(team.iterdir()) == [dst]
    pulled = tmp_path / "pulled.zarr"
    assert kd(tiny_data, "cache", "pull", str(dst), str(pulled)).returncode == 0
    assert files(pulled) == files(train)
