"""Compare methods from one cache: every configuration of the preset's [compare] table, several seeds.

    kd compare --preset mnist1d --seeds 3            # = make compare

Each configuration is a set of dotted overrides on the preset (its method's tuned `method_defaults`
apply underneath). Runs land in data/runs/compare-<name>/<label>-s<seed>/ and are reused when their
resolved config is unchanged; the report goes to data/reports/<name>/: report.md (mean +- std test
accuracy, validation accuracy, wall time per run; perplexity for language models), results.csv (one row
per run) and comparison.png.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline import strict_json
from pipeline.config import Paths, Preset, load_preset, resolve
from pipeline.distill.methods import LABEL_ONLY
from pipeline.errors import KDError
from pipeline.runs.identity import finished_summary, trained_overrides
from pipeline.runs.metrics import metric_of
from pipeline.runs.plots import plot_comparison
from pipeline.runs.reports import (
    aggregate,
    claim_report_folder,
    markdown,
    mean_std,
    metric_of_rows,
    per_seed,
    spec_name,
    table_console,
)
from stages import distill, teacher_logits

console = Console(stderr=True, soft_wrap=True)


def run(
    preset_name: str,
    paths: Paths,
    *,
    seeds: int = 3,
    name: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    device_name: str = "auto",
) -> Path:
    base = load_preset(preset_name)
    entries = dict(base.compare)
    if not entries:
        raise KDError(
            f"preset '{base.name}' has no [compare] table: add one (see pipeline/presets/mnist1d.toml)"
        )
    if only:
        unknown = sorted(set(only) - set(entries))
        if unknown:
            raise KDError(f"unknown compare label(s) {', '.join(unknown)}: choose from {', '.join(entries)}")
        entries = {label: entries[label] for label in only}
    if seeds < 1:
        raise KDError(f"--seeds must be at least 1, got {seeds}")
    spec = {"labels": list(entries), "seeds": seeds, "overrides": trained_overrides(overrides)}
    default = {"labels": list(base.compare), "seeds": 3, "overrides": {}}
    name = name or spec_name(base.name, spec, default)
    report_dir = paths.data / "reports" / name
    claim_report_folder(report_dir, "compare.json", spec, "--name")
    # runs are shared by reports of the same settings (a subset of labels or seeds reuses them)
    runs = spec_name(base.name, {"overrides": spec["overrides"]}, {"overrides": {}})
    # resolve every configuration first, so a bad one fails before any training
    plans = {
        label: [
            resolve(preset_name, {**dict(over), **(overrides or {}), "distill.seed": seed})
            for seed in range(seeds)
        ]
        for label, over in entries.items()
    }

    _build_caches([p for presets in plans.values() for p in presets], paths, device_name)
    results: list[dict[str, Any]] = []
    for label, presets in plans.items():
        for preset in presets:
            run_name = f"compare-{runs}/{_slug(label)}-s{preset.distill.seed}"
            summary = None if force else finished_summary(paths.runs / run_name, preset)
            if summary is None:
                console.print(f"[bold]{label}[/bold] seed {preset.distill.seed}")
                summary = distill.run(
                    preset, paths, run_name=run_name, device_name=device_name, verbose=False
                )
            else:
                console.print(f"{label} seed {preset.distill.seed}: reusing {paths.runs / run_name}")
            results.append({"label": label, **summary})

    rows = aggregate(results)
    _write_csv(report_dir / "results.csv", results)
    teacher_key = f"teacher_test_{rows[0]['metric']}"
    teacher = next((r[teacher_key] for r in results if r.get(teacher_key) is not None), None)
    text = markdown(rows, teacher, base.name, seeds, preset_name, dict(overrides or {}))
    (report_dir / "report.md").write_text(text)
    plot_comparison(
        rows,
        report_dir / "comparison.png",
        title=f"{base.name}: {seeds} seed{'s' if seeds > 1 else ''}",
        teacher_test=teacher,
    )
    _print(rows, teacher)
    console.print(f"report: {report_dir}/report.md, comparison.png, results.csv")
    return report_dir


def _build_caches(presets: list[Preset], paths: Paths, device_name: str) -> None:
    """The caches the configurations read, made (or found: a cache hit costs a manifest read) before any
    training: rows may differ in their cache settings, e.g. the number of augmented views."""
    made: set[str] = set()
    for preset in presets:
        if preset.distill.method in LABEL_ONLY or preset.distill.teacher_online:
            continue
        key = strict_json.dumps([preset.teacher.name, preset.to_dict()["cache"], preset.to_dict()["dataset"]])
        if key not in made:
            made.add(key)
            teacher_logits.run(preset, paths, device_name=device_name)


def _write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    name = metric_of(results[0]).name
    columns = [
        "label",
        "method",
        *(["sparse_target"] if name == "perplexity" else []),
        "seed",
        "temperature",
        "alpha",
        "lr",
        "epochs",
        "best_epoch",
        f"student_val_{name}",
        f"student_test_{name}",
        f"teacher_test_{name}",
        "wall_time_s",
        "run_dir",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def _print(rows: list[dict[str, Any]], teacher: float | None) -> None:
    metric = metric_of_rows(rows)
    unit = "%" if metric.name == "accuracy" else "ppl"
    table = Table(title=f"comparison (test {metric.name} at best validation)")
    for column in (
        "configuration",
        "method",
        f"test {unit}",
        f"val {unit}",
        f"test {unit} per seed",
        "time/run",
    ):
        table.add_column(
            column, justify="left" if column in ("configuration", f"test {unit} per seed") else "right"
        )
    for r in rows:
        table.add_row(
            r["label"],
            r["method"],
            mean_std(r, "test"),
            mean_std(r, "val"),
            per_seed(r, "test", mark=lambda t: f"[bold red]{t}[/bold red]"),
            f"{r['wall_time_s']:.1f}s",
        )
    if teacher is not None:
        table.add_row("teacher", "", f"{metric.scale * teacher:.2f}", "", "", "")
    table_console().print(table)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")
