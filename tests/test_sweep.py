"""`kd sweep`: grid x seeds from one cache, resumable, one-pass == sequential, parallel workers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig, Paths
from pipeline.distill.losses import cross_entropy, hinton_kd
from pipeline.errors import KDError
from pipeline.models import load_checkpoint
from pipeline.training.loop import fit_many
from tests.test_cli import kd


def test_grid_runs_every_combination_and_resumes(tiny_data: Paths) -> None:
    args = [
        "sweep",
        "--preset",
        "tiny",
        "--grid",
        "temperature=2,4",
        "--grid",
        "alpha=0.5,0.9",
        "--grid",
        "epochs=3",
        "--name",
        "grid",
    ]
    result = kd(tiny_data, *args)
    assert result.exit_code == 0, result.output
    out = tiny_data.data / "sweeps" / "grid"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"temperature={t},alpha={a},epochs=3-s0" for t in (2, 4) for a in (0.5, 0.9)]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {(r["distill.temperature"], r["distill.alpha"]) for r in rows} == {
        ("2", "0.5"),
        ("2", "0.9"),
        ("4", "0.5"),
        ("4", "0.9"),
    }
    best = json.loads((out / "best.json").read_text())
    assert best["best"]["val_mean"] == max(100 * float(r["student_val_accuracy"]) for r in rows)
    assert best["command"].startswith("kd distill --preset tiny --set distill.temperature=")
    text = (out / "results.md").read_text()
    assert best["best"]["label"] in text.split("| combination |")[1].splitlines()[2]  # sorted: best first
    assert (out / "accuracy_vs_temperature.png").read_bytes()[:4] == b"\x89PNG"
    for run in runs:
        summary = json.loads((out / "runs" / run / "summary.json").read_text())
        assert summary["epochs"] == 3 and summary["student_test_accuracy"] > 0.1

    again = kd(tiny_data, *args)
    assert (
        again.exit_code == 0
        and "skipping 4 finished runs" in again.stderr
        and "trained 0 runs" in again.stderr
    )


def test_one_pass_equals_sequential(tiny_data: Paths) -> None:
    grid = [
        "--grid",
        "method=ce,kd",
        "--grid",
        "temperature=2,4",
        "--grid",
        "alpha=0.9",
        "--grid",
        "epochs=2",
    ]
    for mode in ("sequential", "one-pass"):
        result = kd(tiny_data, "sweep", "--preset", "tiny", *grid, "--mode", mode, "--name", f"eq-{mode}")
        assert result.exit_code == 0, result.output
    assert "one pass: 3 students" in result.stderr  # ce ignores T: its two combinations train once
    runs = sorted(p.name for p in (tiny_data.data / "sweeps" / "eq-sequential" / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        a, b = (
            tiny_data.data / "sweeps" / f"eq-{mode}" / "runs" / run for mode in ("sequential", "one-pass")
        )
        ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
        for x, y in zip(ma, mb, strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
            assert x["val_accuracy"] == y["val_accuracy"] and x["test_accuracy"] == y["test_accuracy"]
        wa, wb = (
            load_checkpoint(a / "checkpoint")[0].state_dict(),
            load_checkpoint(b / "checkpoint")[0].state_dict(),
        )
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-3), (run, key)
        assert json.loads((b / "config.json").read_text())["mode"] == "one-pass x3"


def test_sweep_never_loads_the_teacher(tiny_data: Paths, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    shutil.copytree(tiny_data.logits, paths.logits)  # no data/teachers at all
    result = kd(
        paths,
        "sweep",
        "--preset",
        "tiny",
        "--grid",
        "temperature=2,4",
        "--grid",
        "alpha=0.9",
        "--grid",
        "epochs=2",
        "--mode",
        "one-pass",
    )
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "sweeps").iterdir()  # named tiny-<hash>: not the preset's own grid
    assert out.name.startswith("tiny-") and len(list((out / "runs").iterdir())) == 2


def test_parallel_workers(tiny_data: Paths) -> None:
    result = kd(
        tiny_data,
        "sweep",
        "--preset",
        "tiny",
        "--grid",
        "temperature=2,4",
        "--grid",
        "alpha=0.9",
        "--grid",
        "epochs=2",
        "--mode",
        "parallel",
        "--devices",
        "cpu,cpu",
        "--name",
        "par",
    )
    assert result.exit_code == 0, result.output
    for t in (2, 4):
        summary = json.loads(
            (
                tiny_data.data
                / "sweeps"
                / "par"
                / "runs"
                / f"temperature={t},alpha=0.9,epochs=2-s0"
                / "summary.json"
            ).read_text()
        )
        assert summary["temperature"] == t and summary["device"] == "cpu"


def test_bad_grid_is_a_one_line_error(tiny_data: Paths) -> None:
    result = kd(tiny_data, "sweep", "--preset", "tiny", "--grid", "temperature")
    assert result.exit_code == 2 and "--grid expects KEY=V1,V2" in result.stderr
    result = kd(tiny_data, "sweep", "--preset", "tiny", "--grid", "temperature=-1")
    assert result.exit_code == 2 and "temperature must be positive" in result.stderr
    result = kd(tiny_data, "sweep", "--preset", "tiny", "--mode", "magic")
    assert result.exit_code == 2 and "unknown --mode 'magic'" in result.stderr


def test_stacked_kd_equals_per_student_losses() -> None:
    zs, zt, y = (
        torch.randn(4, 16, 10, dtype=torch.float64),
        torch.randn(16, 10, dtype=torch.float64),
        torch.randint(0, 10, (16,)),
    )
    temps, alphas, eps = [1.0, 2.0, 4.0, 1.0], [0.9, 0.5, 1.0, 0.0], [0.0, 0.1, 0.0, 0.2]
    for standardize in (False, True):
        got = hinton_kd(
            zs,
            zt,
            y,
            temperature=torch.tensor(temps, dtype=torch.float64),
            alpha=torch.tensor(alphas, dtype=torch.float64),
            label_smoothing=torch.tensor(eps, dtype=torch.float64),
            standardize=standardize,
        )
        for i in range(3):
            expected = hinton_kd(
                zs[i],
                zt,
                y,
                temperature=temps[i],
                alpha=alphas[i],
                label_smoothing=eps[i],
                standardize=standardize,
            )
            assert got[i].item() == pytest.approx(expected.item(), rel=1e-10)
        assert got[3].item() == pytest.approx(
            cross_entropy(zs[3], None, y, label_smoothing=0.2).item(), rel=1e-10
        )


def test_one_pass_refuses_batchnorm_students() -> None:
    models = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    with pytest.raises(KDError, match="without buffers"):
        fit_many(
            models,
            OptimConfig(epochs=1),
            batches=lambda e: [],
            loss_at=[],
            val=(torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64)),
            test=None,
            device=torch.device("cpu"),
        )


def test_combinations_a_method_ignores_are_trained_once(tiny_data: Paths) -> None:
    grid = [
        "--grid",
        "method=kd,annealing",
        "--grid",
        "temperature=2,4",
        "--grid",
        "alpha=0.9",
        "--grid",
        "epochs=13",
    ]
    result = kd(tiny_data, "sweep", "--preset", "tiny", *grid, "--name", "ignored-axes")
    assert result.exit_code == 0, result.output
    assert "3 runs (3 combinations x 1 seeds)" in result.stderr
    assert "trained once: method=annealing,epochs=13" in result.stderr
    out = tiny_data.data / "sweeps" / "ignored-axes"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "method=annealing,epochs=13-s0",
        "temperature=2,alpha=0.9,method=kd,epochs=13-s0",
        "temperature=4,alpha=0.9,method=kd,epochs=13-s0",
    ]
    assert (out / "accuracy_vs_temperature.png").is_file()
