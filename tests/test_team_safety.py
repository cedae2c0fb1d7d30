"""What a team shares is never lost, overwritten or silently wrong: copies behave like `cp` on every
backend, deletes take only caches, runs and reports are never replaced by other settings, the writer
lock cannot be won twice, and no damaged or non-finite cache is ever trained on."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Paths, load_preset, resolve
from pipeline.distill.student_data import prepare
from pipeline.errors import KDError
from pipeline.store import LogitStore, ShardWriter
from stages.cli import app
from tests.conftest import cache_paths
from tests.test_cli import kd, runner
from tests.test_store import make_manifest

BACKENDS = ("folder", "zip", "file-url", "s3")


@pytest.fixture
def backend_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, a destination root that already holds someone else's file)."""
    kind = request.param
    if kind == "s3":
        import fsspec

        url = request.getfixturevalue("s3") + f"/matrix-{os.getpid()}"
        fs, root = fsspec.core.url_to_fs(url)
        fs.pipe_file(f"{root}/someone-else.txt", b"keep me")
        yield kind, url
        return
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "someone-else.txt").write_text("keep me")
    yield kind, (shared.as_uri() if kind == "file-url" else str(shared))


def _read(location: str) -> bytes:
    import fsspec

    with fsspec.open(location if "://" in location else Path(location).as_uri(), "rb") as f:
        return f.read()


@pytest.mark.parametrize("backend_root", BACKENDS, indirect=True)
def test_push_pull_ls_verify_distill_on_every_backend(
    backend_root: tuple[str, str], tiny_data: Paths, tmp_path: Path
) -> None:
    kind, root = backend_root
    (train,) = cache_paths(tiny_data, "train")
    dst = f"{root}/team.zip" if kind == "zip" else f"{root}/"  # a zip is a cache; a folder receives one
    pushed = kd(tiny_data, "cache", "push", str(train), dst)
    assert pushed.exit_code == 0, pushed.output
    copy = f"{root}/team.zip" if kind == "zip" else f"{root}/{train.name}"
    assert "ok:" in pushed.stderr and _read(f"{root}/someone-else.txt") == b"keep me"

    listing = runner.invoke(app, ["cache", "ls", root], env={"COLUMNS": "300"})
    assert listing.exit_code == 0 and "tiny-cnn1d" in listing.stdout, listing.output
    assert kd(tiny_data, "cache", "verify", copy).exit_code == 0

    again = kd(tiny_data, "cache", "push", str(train), dst)
    assert again.exit_code == 2 and "already exists" in again.stderr  # no --force: nothing replaced
    forced = kd(tiny_data, "cache", "push", str(train), dst, "--force")
    assert forced.exit_code == 0, forced.output
    assert _read(f"{root}/someone-else.txt") == b"keep me"  # --force replaced the same cache only
    (test,) = cache_paths(tiny_data, "test")
    manifest = _read(copy if kind == "zip" else f"{copy}/zarr.json")
    other = kd(tiny_data, "cache", "push", str(test), copy, "--force")  # another cache under its name
    assert other.exit_code == 2, other.output
    assert "holds the cache of teacher 'tiny-cnn1d' on mnist1d train, not a copy of" in " ".join(
        other.stderr.split()
    )
    assert _read(copy if kind == "zip" else f"{copy}/zarr.json") == manifest

    local = tmp_path / "mine" / "logits"
    local.mkdir(parents=True)
    (local / "notes.txt").write_text("mine")
    pulled = kd(tiny_data, "cache", "pull", copy, f"{local}/")
    assert pulled.exit_code == 0, pulled.output
    name = _pulled_name(local)  # the source's name, or for a zip the content-addressed one
    assert kind == "zip" or name == train.name
    assert (local / name / "zarr.json").is_file() and (local / "notes.txt").read_text() == "mine"
    assert torch.equal(LogitStore.open(local / name).read_all()[0], LogitStore.open(train).read_all()[0])

    trained = kd(Paths(data=tmp_path / "d"), "distill", "--preset", "tiny", "--cache", copy, "--epochs", "1")
    assert trained.exit_code == 0, trained.output


def _pulled_name(folder: Path) -> str:
    (name,) = [p.name for p in folder.iterdir() if p.name.endswith(".zarr")]
    assert name.startswith("tiny-cnn1d.mnist1d.train.")  # the content-addressed name
    return name


def test_file_url_cache_root_for_both_stages(tiny_data: Paths, tmp_path: Path) -> None:
    root = (tmp_path / "team").as_uri()
    paths = Paths(data=tmp_path / "alice", cache=root)
    shutil.copytree(tiny_data.teachers, paths.teachers)
    result = kd(paths, "--cache-dir", root, "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "team").glob("*.zarr"))) == 2
    result = kd(paths, "--cache-dir", root, "distill", "--preset", "tiny", "--epochs", "1")
    assert result.exit_code == 0, result.output


def test_a_teammate_never_trains_the_teacher_when_caches_exist(tiny_data: Paths, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shutil.copytree(tiny_data.logits, shared)
    bob = Paths(data=tmp_path / "bob", cache=str(shared))
    result = kd(bob, "--cache-dir", str(shared), "train-teacher", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert "not training teacher 'tiny-cnn1d'" in " ".join(result.stderr.split())
    assert not bob.teachers.exists()
    result = kd(bob, "--cache-dir", str(shared), "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0 and result.stderr.count("cache hit") == 2


def test_a_cache_hit_takes_no_lock(tiny_data: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading needs no lock, so a read-only cache folder still gives a cache hit."""
    from stages import teacher_logits

    def no_lock(path: Path) -> None:
        raise AssertionError(f"a hit took the lock of {path}")

    monkeypatch.setattr(teacher_logits, "cache_lock", no_lock)
    written = teacher_logits.run(load_preset("tiny"), tiny_data)
    assert [p.name for p in written] == [cache_paths(tiny_data, s)[0].name for s in ("train", "test")]


def test_stale_lock_takeover_has_one_winner(tmp_path: Path) -> None:
    """Eight processes find the lock of a dead writer at once: exactly one of them gets it."""
    cache = tmp_path / "c.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "c.zarr.lock").write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))
    go = tmp_path / "go"
    code = (
        "import sys, time; from pathlib import Path; from pipeline.store import cache_lock\n"
        "from pipeline.errors import KDError\n"
        "print('ready', flush=True)\n"
        "while not Path(sys.argv[2]).exists(): time.sleep(0.001)\n"
        "try:\n    with cache_lock(Path(sys.argv[1])):\n        print('won', flush=True); time.sleep(2)\n"
        "except KDError:\n    print('lost', flush=True)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(cache), str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()  # all at once
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["lost"] * 7 + ["won"]


def test_half_deleted_cache_can_be_removed(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    (train,) = cache_paths(tiny_data, "train")
    copy = paths.logits / train.name
    shutil.copytree(train, copy)
    (copy / "zarr.json").unlink()
    shutil.rmtree(copy / "logits")
    result = kd(paths, "cache", "rm", train.name, "--yes")
    assert result.exit_code == 0, result.output
    assert not copy.exists()


def test_runs_with_other_settings_get_their_own_folders(tiny_data: Paths) -> None:
    base = kd(tiny_data, "distill", "--preset", "tiny", "--epochs", "1")
    smoothed = kd(tiny_data, "distill", "--preset", "tiny", "--epochs", "1", "--label-smoothing", "0.1")
    assert base.exit_code == 0 and smoothed.exit_code == 0, smoothed.output
    folders = {json.loads(p.read_text())["run_name"]: p.parent for p in tiny_data.runs.glob("*/summary.json")}
    ours = [n for n in folders if n.startswith("tiny-kd-T4-a0.9-s0-")]
    assert len(ours) == 2  # both named by a hash of what they changed: neither replaced the other
    summaries = [json.loads((folders[n] / "summary.json").read_text()) for n in ours]
    changed = sorted(sorted(s["changed_settings"]) for s in summaries)
    assert changed == [
        ["distill.label_smoothing", "distill.train.epochs"],
        ["distill.train.epochs"],
    ]
    assert "settings changed from the preset: distill.label_smoothing=0.1" in " ".join(
        smoothed.stderr.split()
    )


def test_sweeps_of_other_grids_never_replace_a_report(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    shutil.copytree(tiny_data.logits, paths.logits)

    def sweep(*args: str):
        return kd(paths, "sweep", "--preset", "tiny", "--grid", "epochs=1", *args)

    assert sweep("--grid", "temperature=2,4", "--name", "mine").exit_code == 0
    report = (paths.data / "sweeps" / "mine" / "results.md").read_text()
    other = sweep("--grid", "temperature=2", "--name", "mine")
    assert other.exit_code == 2 and "holds a report of another configuration" in other.stderr
    assert (paths.data / "sweeps" / "mine" / "results.md").read_text() == report
    assert sweep("--grid", "temperature=2").exit_code == 0  # unnamed: a name of its own
    assert sweep("--grid", "temperature=8").exit_code == 0
    names = [p.name for p in (paths.data / "sweeps").iterdir()]
    assert len([n for n in names if n.startswith("tiny-")]) == 2


@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
def test_the_printed_command_reproduces_the_number(mode: str, tiny_data: Paths) -> None:
    name = f"repro-{mode}"
    args = ["--grid", "temperature=1,4", "--grid", "epochs=3", "--name", name, "--mode", mode]
    result = kd(tiny_data, "sweep", "--preset", "tiny", *args)
    assert result.exit_code == 0, result.output
    best = json.loads((tiny_data.data / "sweeps" / name / "best.json").read_text())
    assert isinstance(best["best"]["combo"]["distill.temperature"], (int, float))  # a number, not "4"
    (run,) = best["runs"]
    assert run["mode"].startswith("one-pass x") if mode == "one-pass" else run["mode"] == "sequential"
    md = (tiny_data.data / "sweeps" / name / "results.md").read_text()
    assert f"`{best['command']}`" in md and best["command"] in " ".join(result.stdout.split())
    argv = shlex.split(best["command"])
    assert argv[0] == "kd"
    again = kd(tiny_data, *argv[1:])
    assert again.exit_code == 0, again.output
    if mode == "one-pass":
        rerun = tiny_data.data / "sweeps" / f"{name}-repro" / "runs"
        summary = json.loads((rerun / Path(run["run_dir"]).name / "summary.json").read_text())
    else:
        newest = max(tiny_data.runs.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        summary = json.loads(newest.read_text())
    assert summary["student_val_accuracy"] == run["student_val_accuracy"]
    assert summary["student_test_accuracy"] == run["student_test_accuracy"]


def test_nonfinite_teacher_logits_never_complete_a_cache(tmp_path: Path) -> None:
    for dtype, bad in (("float32", float("nan")), ("float16", 1e6)):  # 1e6 overflows float16 to Inf
        store = LogitStore.create(tmp_path / f"{dtype}.zarr", make_manifest(dtype))
        writer = ShardWriter(store)
        logits = torch.randn(24, 5)
        logits[[4, 17], 1] = bad
        with pytest.raises(KDError, match=r"NaN or Inf.* for 2 rows \(sample ids 4, 17\)"):
            writer.add(logits, torch.zeros(24, dtype=torch.long), torch.arange(24))
        writer.abort()
        assert not LogitStore.open(store.where).is_complete


def test_training_stops_on_a_nonfinite_loss(tiny_data: Paths) -> None:
    result = kd(tiny_data, "distill", "--preset", "tiny", "--epochs", "2", "--lr", "1e30", "--run-name", "x")
    assert result.exit_code == 2, result.output
    line = " ".join(result.stderr.split())
    assert "training stopped at epoch 1 (kd): the loss is nan (not finite) with temperature=4" in line
    assert "lr=1e+30" in line and "Traceback" not in result.output
    assert not (tiny_data.runs / "x" / "summary.json").exists()


def test_checkpoints_follow_the_umask(tiny_data: Paths) -> None:
    weights = tiny_data.teachers / "tiny-cnn1d" / "model.safetensors"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~mask


def test_verify_summarises_an_incomplete_cache(tiny_data: Paths, tmp_path: Path) -> None:
    import zarr

    (train,) = cache_paths(tiny_data, "train")
    copy = tmp_path / train.name
    shutil.copytree(train, copy)
    zarr.open_group(copy, mode="r+")["done"][1:] = False
    result = kd(tiny_data, "cache", "verify", str(copy))
    text = " ".join(result.stderr.split())
    assert result.exit_code == 1 and "3 shards (1, 2, 3) of 4 are not written" in text
    assert "it resumes" in text and "--force" not in text


def _corrupt(path: Path, rng: random.Random) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    how = rng.choice(["flip", "truncate", "zero"])
    if how == "truncate" or not data:
        data = data[: rng.randrange(len(data) + 1)]
    elif how == "flip":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    else:
        at = rng.randrange(len(data))
        data[at : at + 16] = bytes(len(data[at : at + 16]))
    target.write_bytes(bytes(data))
    return f"{how} {target.relative_to(path)}"


def test_random_damage_is_found_or_harmless(tiny_data: Paths, tmp_path: Path) -> None:
    """48 random corruptions (fixed seed) of random files of a small cache: verify reports a problem or
    the cache still reads exactly as before, and training's data path never yields other logits."""
    preset = resolve("tiny")
    (train,) = cache_paths(tiny_data, "train")
    paths = Paths(data=tmp_path / "d")
    reference = prepare(preset, tiny_data, cache=train, device=torch.device("cpu"))
    expected = reference.batches.teacher_logits
    rng = random.Random(1234)
    refused = 0
    for case in range(48):
        copy = tmp_path / f"{case}" / train.name
        shutil.copytree(train, copy)
        what = _corrupt(copy, rng)
        try:
            problems = LogitStore.open(copy).verify()
        except KDError:
            problems = ["cannot be opened"]
        try:
            prepared = prepare(preset, paths, cache=copy, device=torch.device("cpu"))
        except KDError:
            refused += 1
            assert problems, f"{what}: training refused it but verify found nothing"
            continue
        got = prepared.batches.teacher_logits
        assert got is not None and torch.equal(got, expected), f"{what}: trained on other logits"
        assert torch.isfinite(got).all()
        shutil.rmtree(copy.parent)
    assert refused >= 24  # most damage matters; the rest hit bytes nobody reads (e.g. JSON whitespace)


def test_nan_cache_is_refused_before_the_first_batch(tiny_data: Paths, tmp_path: Path) -> None:
    import zarr

    (train,) = cache_paths(tiny_data, "train")
    copy = tmp_path / train.name
    shutil.copytree(train, copy)
    group = zarr.open_group(copy, mode="r+")
    logits = np.asarray(group["logits"][:])
    logits[300, 0] = np.inf
    store = LogitStore.open(copy, writable=True)
    for shard in range(store.num_shards):  # consistent checksums: only the values are wrong
        a, b = store.shard_range(shard)
        store.write_shard(shard, logits[a:b], group["labels"][a:b], group["index"][a:b])
    store.finish()
    for budget in (2048, 0):  # in memory and streamed
        preset = resolve("tiny", {"distill.memory_budget_mb": budget})
        with pytest.raises(KDError, match="holds NaN or Inf logits in 1 rows"):
            data = prepare(preset, tiny_data, cache=copy, device=torch.device("cpu"))
            next(iter(data.batches.epoch(torch.Generator().manual_seed(0))))
