"""End to end through the `kd` CLI on the tiny preset: dump, distill, inspect, and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from pipeline.config import Paths, load_preset
from pipeline.data.datasets import load_split
from pipeline.models import fingerprint, load_checkpoint
from pipeline.store import LogitStore
from stages.cli import app
from tests.conftest import cache_paths
from tests.factories import PRECISION

runner = CliRunner()


def kd(paths: Paths, *args: str):
    return runner.invoke(app, ["--data-dir", str(paths.data), *args])


def assert_one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 3 and lines[0].startswith("error:"), result.stderr  # one message, soft-wrapped
    assert text in " ".join(result.stderr.split()), result.stderr


def test_teacher_logits_writes_complete_caches_with_manifest(tiny_data: Paths) -> None:
    preset = load_preset("tiny")
    teacher, record = load_checkpoint(tiny_data.teachers / "tiny-cnn1d")
    for split in ("train", "test"):
        (path,) = cache_paths(tiny_data, split)
        store = LogitStore.open(path)
        store.require_complete()
        m = store.manifest
        data = load_split(preset.dataset, split)
        assert m.format == {"name": "kd-logits", "version": 2}
        assert m.teacher.name == "tiny-cnn1d" and m.teacher.architecture["arch"] == "cnn1d"
        assert m.teacher.fingerprint == fingerprint(teacher, record["architecture"])
        assert m.teacher.train_accuracy == record["train_accuracy"]
        assert (m.dataset.name, m.dataset.split, m.dataset.length) == ("mnist1d", split, len(data))
        assert m.dataset.fingerprint == data.fingerprint
        assert m.storage.dtype == "float16" and (m.storage.chunk_rows, m.storage.shard_rows) == (64, 256)
        assert m.preprocessing == {**data.preprocessing, "teacher_precision": PRECISION}  # CPU: fp32
        assert {"torch", "zarr", "numpy", "kd"} <= set(m.software)
        assert m.created and m.complete
        # the stored logits are the teacher's own: its accuracy recomputed from them matches
        logits, labels, ids = store.read_all()
        assert labels.tolist() == data.labels.tolist() and ids.tolist() == data.ids.tolist()
        assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(m.teacher_accuracy)
        assert m.teacher_accuracy > 0.5
        assert zarr.open_array(path / "logits", mode="r").dtype == "float16"
    assert LogitStore.open(cache_paths(tiny_data, "train")[0]).num_shards == 4


def test_second_dump_is_a_cache_hit(tiny_data: Paths) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_data.logits.rglob("*") if p.is_file()}
    result = kd(tiny_data, "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("cache hit") == 2
    assert before == {p: p.stat().st_mtime_ns for p in tiny_data.logits.rglob("*") if p.is_file()}


def test_distill_end_to_end(tiny_data: Paths) -> None:
    result = kd(tiny_data, "distill", "--preset", "tiny", "-T", "2", "--alpha", "0.8", "--run-name", "e2e")
    assert result.exit_code == 0, result.output
    run = tiny_data.runs / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "kd" and summary["temperature"] == 2.0 and summary["alpha"] == 0.8
    assert summary["epochs"] == 20 and summary["student_test_accuracy"] > 0.25  # chance is 0.10
    assert (
        summary["teacher_test_accuracy"]
        == LogitStore.open(cache_paths(tiny_data, "test")[0]).manifest.teacher_accuracy
    )
    assert summary["cache"] == str(cache_paths(tiny_data, "train")[0]) and summary["wall_time_s"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 21))
    best = max(metrics, key=lambda m: m["val_accuracy"])
    assert (
        summary["best_epoch"] == best["epoch"] and summary["student_test_accuracy"] == best["test_accuracy"]
    )
    config = json.loads((run / "config.json").read_text())
    assert config["preset"]["distill"]["temperature"] == 2.0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student, record = load_checkpoint(run / "checkpoint")
    assert record["epoch"] == summary["best_epoch"]
    assert (
        "teacher test" in result.stdout and f"{100 * summary['student_test_accuracy']:.2f}%" in result.stdout
    )


def test_distill_runs_with_the_teacher_deleted(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    shutil.copytree(tiny_data.logits, paths.logits)  # caches only: no teacher checkpoint anywhere
    assert not paths.teachers.exists()
    result = kd(paths, "distill", "--preset", "tiny", "--run-name", "noteacher")
    assert result.exit_code == 0, result.output
    assert json.loads((paths.runs / "noteacher" / "summary.json").read_text())["student_test_accuracy"] > 0.25
    # and stage 1 also recognises its caches without the teacher
    result = kd(paths, "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0 and result.stderr.count("cache hit") == 2


def test_ce_baseline_needs_no_cache(tmp_path: Path) -> None:
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny", "--method", "ce")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "tiny-ce-s0" / "summary.json").read_text())
    assert summary["method"] == "ce" and summary["cache"] is None and summary["student_test_accuracy"] > 0.25


def test_streamed_cache_trains(tiny_data: Paths) -> None:
    result = kd(
        tiny_data,
        "distill",
        "--preset",
        "tiny",
        "--set",
        "distill.memory_budget_mb=0",
        "--run-name",
        "streamed",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tiny_data.runs / "streamed" / "config.json").read_text())["batches"].startswith(
        "cache streamed"
    )
    assert (
        json.loads((tiny_data.runs / "streamed" / "summary.json").read_text())["student_test_accuracy"] > 0.25
    )


def test_fingerprint_mismatch_is_refused(tiny_data: Paths, tmp_path: Path) -> None:
    (train_cache,) = cache_paths(tiny_data, "train")
    result = kd(
        Paths(data=tmp_path),
        "distill",
        "--preset",
        "tiny",
        "--set",
        "dataset.seed=7",
        "--cache",
        str(train_cache),
    )
    assert_one_line_error(result, "was computed on different data")
    assert not (tmp_path / "runs").exists()


def test_length_mismatch_is_refused(tiny_data: Paths, tmp_path: Path) -> None:
    (train_cache,) = cache_paths(tiny_data, "train")
    result = kd(
        Paths(data=tmp_path),
        "distill",
        "--preset",
        "tiny",
        "--set",
        "dataset.num_samples=900",
        "--cache",
        str(train_cache),
    )
    assert_one_line_error(result, "has 800 rows but the mnist1d train split has 720")


def test_wrong_split_is_refused(tiny_data: Paths, tmp_path: Path) -> None:
    (test_cache,) = cache_paths(tiny_data, "test")
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny", "--cache", str(test_cache))
    assert_one_line_error(result, "holds the 'test' split, not 'train'")


def test_incomplete_cache_is_refused(tiny_data: Paths, tmp_path: Path) -> None:
    (train_cache,) = cache_paths(tiny_data, "train")
    copy = tmp_path / "partial.zarr"
    shutil.copytree(train_cache, copy)
    group = zarr.open_group(copy, mode="r+")
    group["done"][3] = False  # as if killed before the last shard landed
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny", "--cache", str(copy))
    assert_one_line_error(result, "is incomplete (3/4 shards written)")


def test_missing_cache_is_refused(tmp_path: Path) -> None:
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny")
    assert_one_line_error(result, "no complete train-split cache of teacher 'tiny-cnn1d'")
    result = kd(Paths(data=tmp_path), "distill", "--preset", "tiny", "--cache", str(tmp_path / "nope.zarr"))
    assert_one_line_error(result, "no logit cache at")


def test_dump_without_teacher_or_cache_is_refused(tmp_path: Path) -> None:
    result = kd(Paths(data=tmp_path), "teacher-logits", "--preset", "tiny")
    assert_one_line_error(result, "no teacher checkpoint at")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-T", "-1"], "temperature must be positive, got -1.0"),
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--preset", "imagenet-9000"], "unknown preset 'imagenet-9000'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--set", "distill.nope=1"], "unknown setting 'distill.nope'"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = kd(
        Paths(data=tmp_path), "distill", *(["--preset", "tiny"] if "--preset" not in args else []), *args
    )
    assert_one_line_error(result, message)


def test_cache_info_and_ls(tiny_data: Paths) -> None:
    (train_cache,) = cache_paths(tiny_data, "train")
    result = kd(tiny_data, "cache", "info", str(train_cache), "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest == LogitStore.open(train_cache).manifest.to_dict()
    result = kd(tiny_data, "cache", "info", str(train_cache))
    assert result.exit_code == 0 and "tiny-cnn1d" in result.stdout and "float16" in result.stdout
    result = runner.invoke(app, ["--data-dir", str(tiny_data.data), "cache", "ls"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "tiny-cnn1d" in line]
    assert len(rows) == 2 and all("800" in r or "200" in r for r in rows) and all("yes" in r for r in rows)
    result = kd(tiny_data, "cache", "ls", str(tiny_data.data / "nowhere"))
    assert_one_line_error(result, "no cache directory at")


@pytest.mark.gpu
def test_dump_and_distill_on_cuda(tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    for args in (["train-teacher"], ["teacher-logits"], ["distill", "--run-name", "cuda"]):
        result = kd(paths, *args, "--preset", "tiny", "--device", "cuda")
        assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "cuda" / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["student_test_accuracy"] > 0.25


def test_cache_hit_runs_no_teacher(tiny_data: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.teacher_logits as stage

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher ran on a cache hit")

    monkeypatch.setattr(stage, "write_logits", no_teacher)
    result = kd(tiny_data, "teacher-logits", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("cache hit") == 2


def _commands(group, path=()):  # noqa: ANN001, ANN202
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):  # a group: `kd cache`
            yield from _commands(command, (*path, name))


def test_every_commands_help_renders_all_its_words() -> None:
    """Help text is plain: "[compare]", "[default: ...]" and every other word of each option's help show up
    (rich markup used to eat bracketed words), for every command, with -h as well as --help."""
    import typer.main

    group = typer.main.get_command(app)
    seen = 0
    for path, command in _commands(group):
        result = runner.invoke(app, [*path, "-h"], env={"COLUMNS": "2000"})
        assert result.exit_code == 0, (path, result.output)
        shown = " ".join(result.output.split())
        texts = [command.help or ""] + [p.help or "" for p in command.params if getattr(p, "help", None)]
        for text in texts:
            assert " ".join(text.split()) in shown, (path, text)
        seen += 1
    assert seen >= 15  # every stage command and every `kd cache` subcommand
    assert "[compare]" in " ".join(runner.invoke(app, ["compare", "--help"]).output.split())


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"kd {version('kd-cache')}"


def test_plain_progress_lines_without_a_terminal(tiny_data: Paths) -> None:
    """With output redirected (a cluster job, tee, nohup) tqdm hides its bar: one plain line per epoch
    on stderr carries the same numbers."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KD_DATA_DIR": str(tiny_data.data), "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    result = subprocess.run(
        [sys.executable, "-c", "from stages.cli import app; app()", "distill", "--preset", "tiny",
         "--epochs", "3", "--run-name", "plain-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kd: epoch")]
    assert [line.split(" loss ")[0] for line in lines] == ["kd: epoch 1/3", "kd: epoch 2/3", "kd: epoch 3/3"]
    metrics = [
        json.loads(m) for m in (tiny_data.runs / "plain-progress" / "metrics.jsonl").read_text().splitlines()
    ]
    for line, m in zip(lines, metrics, strict=True):
        assert f"loss {m['train_loss']:.4f} val {100 * m['val_accuracy']:.2f}%" in line


def test_a_forked_kd_is_the_real_kd(tiny_data: Paths) -> None:
    """tests/cli_process.py runs `kd` as a fork of a process that imported kd's modules: the same exit
    codes, stdout and stderr as the installed `kd` command, for a success and a refusal."""
    import os
    import subprocess
    import sys

    from tests import cli_process

    env = {**os.environ, "KD_DATA_DIR": str(tiny_data.data), "TQDM_DISABLE": "1", "COLUMNS": "400"}
    kd_command = Path(sys.executable).with_name("kd")
    (train,) = cache_paths(tiny_data, "train")
    commands = {  # command: its exit code
        ("cache", "verify", str(train)): 0,
        ("teacher-logits", "--preset", "tiny", "--set", "cache.views=4"): 2,  # refused
    }
    for args, code in commands.items():
        real = subprocess.run([kd_command, *args], env=env, capture_output=True, text=True, timeout=300)
        forked = cli_process.run(list(args), env)
        assert real.returncode == code, real.stderr
        assert (forked.returncode, forked.stdout, forked.stderr) == (code, real.stdout, real.stderr)


def test_config_show_prints_a_preset() -> None:
    import tomllib

    result = runner.invoke(
        app, ["config", "show", "--preset", "tiny", "-m", "dkd", "--set", "distill.seed=3"]
    )
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.stdout)
    assert shown["distill"]["method"] == "dkd" and shown["distill"]["seed"] == 3
    assert shown["distill"]["dkd"]["warmup_epochs"] == 3  # tiny's own value


def test_global_options_after_the_subcommand(tiny_data: Paths) -> None:
    (train,) = cache_paths(tiny_data, "train")
    for args in (
        ["cache", "ls", "--data-dir", str(tiny_data.data)],
        ["cache", "ls", f"--data-dir={tiny_data.data}"],
    ):
        result = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        assert train.name in result.output


def test_cache_ls_fits_80_columns_with_full_names_and_json(tiny_data: Paths) -> None:
    names = sorted(p.name for split in ("train", "test") for p in cache_paths(tiny_data, split))
    result = runner.invoke(app, ["--data-dir", str(tiny_data.data), "cache", "ls"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    for name in names:  # what `kd cache rm` needs, never cut
        assert any(line.startswith(name + " ") for line in result.stdout.splitlines()), result.stdout
    listed = json.loads(
        runner.invoke(app, ["--data-dir", str(tiny_data.data), "cache", "ls", "--json"]).stdout
    )
    assert sorted(e["name"] for e in listed) == names
    train = next(e for e in listed if e["split"] == "train")
    manifest = LogitStore.open(tiny_data.logits / train["name"]).manifest
    assert (train["rows"], train["teacher_accuracy"], train["created"], train["complete"]) == (
        800,
        manifest.teacher_accuracy,
        manifest.created,
        True,
    )
