"""Reports over runs, shared by `kd compare` and `kd sweep`: one row per configuration aggregated over
seeds (mean +- std of the run metric, accuracy or perplexity), outliers among the seeds, the Markdown
table, and the report folder's claim (one folder, one spec).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline import strict_json
from pipeline.errors import KDError
from pipeline.runs.metrics import ACCURACY, METRICS, Metric, metric_of


def spec_name(base: str, spec: dict[str, Any], default: dict[str, Any]) -> str:
    """`base` for the preset's own configuration, else `base-<hash of spec>`: reports and run folders of
    other configurations never replace it."""
    if spec == default:
        return base
    return f"{base}-{hashlib.sha256(strict_json.dumps(spec).encode()).hexdigest()[:6]}"


def claim_report_folder(folder: Path, spec_file: str, spec: dict[str, Any], option: str) -> None:
    """Make `folder` hold reports of `spec` (written to `spec_file`), refusing one made for another."""
    record = folder / spec_file
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            previous = None
        if previous != json.loads(strict_json.dumps(spec)):
            raise KDError(
                f"{folder} holds a report of another configuration ({record}): not replacing it; "
                f"pass {option} NAME for a new one"
            )
    elif folder.exists() and any(folder.iterdir()):
        raise KDError(f"{folder} exists and holds other files: not writing into it; pass {option} NAME")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(strict_json.dumps(spec, indent=2) + "\n")


def outliers(values: list[float], metric: Metric = ACCURACY) -> list[int]:
    """Indices of values far from the rest: more than max(3 robust standard deviations (1.4826 x the
    median absolute deviation), the metric's margin: 5 accuracy points, 10% of a perplexity) from the
    median. Needs 3 values or more: a collapsed seed among healthy ones (68 next to 95, 95) is marked,
    ordinary seed noise is not."""
    if len(values) < 3:
        return []
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    limit = max(3 * 1.4826 * mad, metric.margin(median))
    return [i for i, v in enumerate(values) if abs(v - median) > limit + 1e-6]  # 49.00 vs 44.00 is not "more"


def mean_std(row: dict[str, Any], metric: str) -> str:
    """`mean ± std` over seeds, or the single value for one seed (no "± 0.00")."""
    if row["seeds"] == 1:
        return f"{row[f'{metric}_mean']:.2f}"
    return f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}"


def per_seed(row: dict[str, Any], metric: str, mark: Callable[[str], str] = lambda t: f"**{t}**") -> str:
    """Every seed's value, outliers marked: `s0 95.10, s1 95.30, **s2 68.20 (outlier)**`."""
    marked = set(row[f"{metric}_outliers"])
    return ", ".join(
        mark(f"s{seed} {v:.2f} (outlier)") if i in marked else f"s{seed} {v:.2f}"
        for i, (seed, v) in enumerate(zip(row["seed_numbers"], row[metric], strict=True))
    )


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: each seed's test and validation metric (accuracy in %, or a language model's
    perplexity) with outlier seeds marked, their mean and std, mean wall time."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label]
        metric = metric_of(runs[0])
        test = [metric.shown(r, "test") for r in runs]
        val = [metric.shown(r, "val") for r in runs]
        rows.append(
            {
                "label": label,
                "method": runs[0]["method"],
                "method_label": runs[0].get("method_label", runs[0]["method"]),
                "metric": metric.name,
                "seeds": len(runs),
                "seed_numbers": [r["seed"] for r in runs],
                "test": test,
                "val": val,
                "test_outliers": outliers(test, metric),
                "val_outliers": outliers(val, metric),
                "test_mean": statistics.mean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "val_mean": statistics.mean(val),
                "val_std": statistics.stdev(val) if len(val) > 1 else 0.0,
                "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            }
        )
    return rows


def metric_of_rows(rows: list[dict[str, Any]]) -> Metric:
    return METRICS[rows[0]["metric"]] if rows else ACCURACY


def markdown(
    rows: list[dict[str, Any]],
    teacher: float | None,
    preset: str,
    seeds: int,
    preset_arg: str,
    overrides: dict[str, Any] | None = None,
) -> str:
    metric = metric_of_rows(rows)
    sets = "".join(
        f" --set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (overrides or {}).items()
    )
    lines = [
        f"# Method comparison on `{preset}`",
        "",
        f"Command: `kd compare --preset {preset_arg} --seeds {seeds}{sets}`. Test {metric.name} at the "
        f"best-validation epoch, mean ± std over {seeds} seed{'s' if seeds > 1 else ''}; validation selects "
        f"checkpoints, test is only reported{'' if metric.higher_is_better else ' (lower is better)'}.",
        "",
        f"| configuration | method | test {metric.header} | val {metric.header} | test {metric.header} per "
        "seed | time / run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['method_label']} | {mean_std(r, 'test')} | {mean_std(r, 'val')} | "
            f"{per_seed(r, 'test')} | {r['wall_time_s']:.1f} s |"
        )
    if teacher is not None:
        lines.append(f"| teacher | | {metric.scale * teacher:.2f} | | | |")
    lines += outlier_notes(rows)
    lines += ["", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def outlier_notes(rows: list[dict[str, Any]]) -> list[str]:
    """A paragraph naming every outlier seed, so a collapse is read, not averaged away."""
    flagged = [
        f"{r['label']} seed {r['seed_numbers'][i]} ({metric} {r[metric][i]:.2f})"
        for r in rows
        for metric in ("test", "val")
        for i in r[f"{metric}_outliers"]
    ]
    if not flagged:
        return []
    return [
        "",
        f"**Outlier seeds** (more than max(3 robust std, {metric_of_rows(rows).margin_text()}) from their "
        f"configuration's median): {'; '.join(dict.fromkeys(flagged))}. The mean ± std includes them: look "
        "at those runs (curves.png) before trusting the mean.",
    ]


def table_console() -> Console:
    """The console for result tables: the terminal's width, or 160 columns when output goes to a file or
    a pipe (rich would assume 80 and cut labels such as "continuation, no margin (ablation)")."""
    console = Console()
    return console if console.is_terminal else Console(width=160)
