"""Every method end to end on the tiny preset, Annealing-KD's two phases, `kd compare` and TAKD chaining."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from pipeline.config import Paths
from pipeline.distill.losses import LOSSES
from pipeline.models import load_checkpoint
from stages.cli import app
from tests.test_cli import assert_one_line_error, kd, runner


def metrics_of(paths: Paths, run: str) -> list[dict]:
    return [json.loads(line) for line in (paths.runs / run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_method_trains_from_the_cache(tiny_data: Paths, method: str) -> None:
    result = kd(
        tiny_data,
        "distill",
        "--preset",
        "tiny",
        "--method",
        method,
        "--epochs",
        "10",
        "--set",
        "distill.annealing.phase1_epochs=6",
        "--set",
        "distill.continuation.psi_epochs=6",
        "--run-name",
        f"m-{method}",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tiny_data.runs / f"m-{method}" / "summary.json").read_text())
    assert summary["method"] == method and summary["student_test_accuracy"] > 0.15  # chance: 0.10
    metrics = metrics_of(tiny_data, f"m-{method}")
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    assert all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN
    if method == "continuation":  # schedule values are logged per epoch: psi ramps 0 -> 1 over 4 epochs
        assert [m["psi"] for m in metrics[:7]] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
        assert metrics[0]["phi"] == pytest.approx(0.25) and metrics[-1]["phi"] == 1.0  # t_max 4 over 10
    if method == "annealing":
        assert [m["phase"] for m in metrics] == ["annealing"] * 6 + ["annealing-ce"] * 4
        # tau_max 4 over 6 epochs: k = 1, T = 4, 3, 2, 1, 1, 1 (the last level gets the remainder)
        assert [m["phi"] for m in metrics[:6]] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        checkpoint = json.loads((tiny_data.runs / f"m-{method}" / "checkpoint" / "config.json").read_text())
        assert checkpoint["phase"] == "annealing-ce"  # the run's model is phase 2's best, as written


def test_annealing_phase2_starts_from_best_phase1_checkpoint(tiny_data: Paths) -> None:
    # a learning rate of ~0 in phase 2 freezes the student: what phase 2 evaluates is what it started from
    result = kd(
        tiny_data,
        "distill",
        "--preset",
        "tiny",
        "--method",
        "annealing",
        "--epochs",
        "8",
        "--set",
        "distill.annealing.phase1_epochs=6",
        "--set",
        "distill.annealing.phase2_lr=1e-30",
        "--set",
        "distill.train.weight_decay=0",
        "--run-name",
        "ann-start",
    )
    assert result.exit_code == 0, result.output
    metrics = metrics_of(tiny_data, "ann-start")
    phase1 = [m for m in metrics if m["phase"] == "annealing"]
    best1 = max(phase1, key=lambda m: m["val_accuracy"])
    phase2 = [m for m in metrics if m["phase"] == "annealing-ce"]
    assert phase2[0]["val_accuracy"] == best1["val_accuracy"]
    assert phase2[0]["test_accuracy"] == best1["test_accuracy"]
    saved1, info1 = load_checkpoint(tiny_data.runs / "ann-start" / "checkpoint-annealing")
    final, info = load_checkpoint(tiny_data.runs / "ann-start" / "checkpoint")
    assert info1["epoch"] == best1["epoch"] and info["phase"] == "annealing-ce"
    for a, b in zip(saved1.state_dict().values(), final.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_annealing_needs_a_phase2(tmp_path) -> None:
    result = kd(
        Paths(data=tmp_path), "distill", "--preset", "tiny", "--method", "annealing", "--epochs", "12"
    )
    assert result.exit_code == 2
    assert "annealing.phase1_epochs (12) must be smaller than the total epochs (12)" in " ".join(
        result.stderr.split()
    )


def test_method_defaults_apply_under_cli_overrides(tiny_data: Paths) -> None:
    from pipeline.config import resolve

    assert resolve("tiny", {"distill.method": "annealing"}).distill.train.lr == 3e-3  # tiny's method default
    assert (
        resolve("tiny", {"distill.method": "annealing", "distill.train.lr": "0.02"}).distill.train.lr == 0.02
    )
    assert resolve("tiny", {"distill.method": "kd"}).distill.train.lr == 1e-2


def test_compare_writes_report_and_reuses_runs(tiny_data: Paths) -> None:
    args = [
        "--data-dir",
        str(tiny_data.data),
        "compare",
        "--preset",
        "tiny",
        "--seeds",
        "2",
        "--only",
        "scratch (ce)",
        "--only",
        "kd T=2",
        "--set",
        "distill.train.epochs=4",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (report,) = (tiny_data.data / "reports").glob("tiny-*")  # a subset, other settings: its own name
    with (report / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["seed"]) for r in rows] == [
        ("scratch (ce)", "0"),
        ("scratch (ce)", "1"),
        ("kd T=2", "0"),
        ("kd T=2", "1"),
    ]
    text = (report / "report.md").read_text()
    kd_tests = [100 * float(r["student_test_accuracy"]) for r in rows if r["label"] == "kd T=2"]
    assert f"| kd T=2 | kd | {sum(kd_tests) / 2:.2f} ± " in text and "| teacher |" in text
    assert (report / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.stderr.count("reusing") == 4


def test_compare_rejects_unknown_labels(tiny_data: Paths) -> None:
    result = kd(tiny_data, "compare", "--preset", "tiny", "--only", "nope")
    assert result.exit_code == 2 and "unknown compare label(s) nope" in result.stderr


def test_takd_by_chaining(tiny_data: Paths) -> None:
    """teacher -> assistant (a distilled CNN) -> its logits (stage 1) -> a student distilled from those."""
    assistant = ["--set", "student.arch=cnn1d", "--set", 'student.options={"channels": 8}']
    result = kd(tiny_data, "distill", "--preset", "tiny", *assistant, "--run-name", "assistant")
    assert result.exit_code == 0, result.output
    result = kd(
        tiny_data,
        "teacher-logits",
        "--preset",
        "tiny",
        "--teacher",
        str(tiny_data.runs / "assistant" / "checkpoint"),
        "--set",
        "teacher.name=tiny-assistant",
    )
    assert result.exit_code == 0, result.output
    caches = sorted(tiny_data.logits.glob("tiny-assistant.*.zarr"))
    assert len(caches) == 2
    student = [
        "distill",
        "--preset",
        "tiny",
        "--set",
        "teacher.name=tiny-assistant",
        "--run-name",
        "takd-student",
    ]
    # the preset must describe the teacher whose logits it reads: the tiny teacher's model is refused
    refused = kd(tiny_data, *student)
    assert_one_line_error(refused, "built as cnn1d {'channels': 8}, but the preset's teacher.model is cnn1d")
    result = kd(tiny_data, *student, "--set", 'teacher.model.options={"channels": 8}')
    assert result.exit_code == 0, result.output
    summary = json.loads((tiny_data.runs / "takd-student" / "summary.json").read_text())
    assert summary["teacher"] == "tiny-assistant" and "tiny-assistant" in summary["cache"]
    assert summary["student_test_accuracy"] > 0.2
