"""Sweep a grid of settings over one cache: every combination x seeds, resumable, with a report.

    kd sweep --preset mnist1d --grid temperature=1,2,4,8 --grid alpha=0.5,0.9 --seeds 3     # = make sweep
    kd sweep ... --mode one-pass          # students of one seed trained together (torch.func.vmap)
    kd sweep ... --mode parallel --devices cuda:0,cuda:1      # one worker process per device

The grid comes from the preset's [sweep] table and/or --grid KEY=V1,V2 (KEY a dotted setting or one of
the short names below). Runs land in data/sweeps/<name>/runs/<combination>-s<seed>/; a rerun skips the
ones already finished with the same resolved settings. The report: results.csv (one row per run),
results.md (combinations sorted by validation accuracy, with test accuracy and wall time; perplexity,
lower first, for language models), plots of the metric against the first numeric grid key per method,
and the best combination with the command that reproduces it.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline import strict_json
from pipeline.config import Paths, Preset, load_preset, parse_literal, resolve
from pipeline.distill.methods import LOSS_ONLY
from pipeline.distill.methods import phases as method_phases
from pipeline.distill.phases import phases
from pipeline.distill.student_data import prepare
from pipeline.errors import KDError
from pipeline.models import build_model
from pipeline.runs.identity import check_run_folder, finished_summary, trained_overrides, used_settings
from pipeline.runs.metrics import METRICS, metric_of
from pipeline.runs.plots import plot_sweep
from pipeline.runs.recorder import RunRecorder
from pipeline.runs.reports import (
    aggregate,
    claim_report_folder,
    mean_std,
    outlier_notes,
    per_seed,
    spec_name,
    table_console,
)
from pipeline.training.loop import fit_many, pick_device, seed_everything
from stages import distill

console = Console(stderr=True, soft_wrap=True)
SHORT_KEYS = {
    "method": "distill.method",
    "temperature": "distill.temperature",
    "T": "distill.temperature",
    "alpha": "distill.alpha",
    "label_smoothing": "distill.label_smoothing",
    "sparse_target": "distill.sparse_target",
    "standardize": "distill.standardize",
    "lr": "distill.train.lr",
    "epochs": "distill.train.epochs",
    "batch_size": "distill.train.batch_size",
}
MODES = ("sequential", "one-pass", "parallel")


def run(
    preset_name: str,
    paths: Paths,
    *,
    grid: Sequence[str] = (),
    seeds: int = 1,
    name: str | None = None,
    mode: str = "sequential",
    devices: Sequence[str] = (),
    force: bool = False,
    overrides: Mapping[str, Any] | None = None,
    device_name: str = "auto",
) -> Path:
    if mode not in MODES:
        raise KDError(f"unknown --mode '{mode}': choose one of {', '.join(MODES)}")
    if seeds < 1:
        raise KDError(f"--seeds must be at least 1, got {seeds}")
    base = load_preset(preset_name)
    if base.dataset.name == "lm-text" and mode == "one-pass":
        raise KDError(
            f"--mode one-pass trains classifiers together; '{base.name}' is a language-model preset: use "
            "--mode sequential (the default) or parallel"
        )
    axes = parse_grid(base.sweep, grid)
    spec = {"grid": axes, "seeds": seeds, "overrides": trained_overrides(overrides), "mode": mode}
    default = {"grid": parse_grid(base.sweep, []) if base.sweep else None, "seeds": 1, "overrides": {}}
    name = name or spec_name(base.name, spec, {**default, "mode": "sequential"})
    out = paths.data / "sweeps" / name
    claim_report_folder(out, "sweep.json", spec, "--name")
    plan = []  # (label, combination, preset)
    seen: set[str] = set()
    same: list[str] = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values, strict=True))
        presets = [
            resolve(preset_name, {**(overrides or {}), **combo, "distill.seed": seed})
            for seed in range(seeds)
        ]
        # a combination differing from an earlier one only in settings its method ignores (T for
        # annealing, alpha for dkd, ...) trains the same students: run it once, named by what it uses
        used = used_settings(presets[0])
        combo = {k: v for k, v in combo.items() if k in used}
        label = ",".join(f"{_short(k)}={v}" for k, v in combo.items()) or "base"
        key = strict_json.dumps(sorted(used.items()))
        if key in seen:
            same.append(label)
            continue
        seen.add(key)
        plan += [(label, combo, preset) for preset in presets]
    console.print(
        f"sweep '{name}': {len(plan)} runs ({len(plan) // seeds} combinations x {seeds} seeds), {mode}",
        highlight=False,
    )
    if same:
        console.print(
            f"{len(same)} combination(s) differ only in settings their method ignores and are trained once: "
            f"{', '.join(dict.fromkeys(same))}",
            highlight=False,
        )

    done: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (label, _, preset) in enumerate(plan):
        summary = None if force else finished_summary(_run_dir(out, label, preset), preset)
        if summary is None:
            todo.append(i)
        else:
            done[i] = summary
    if done:
        console.print(f"skipping {len(done)} finished runs")
    started = time.perf_counter()
    jobs = [(plan[i][0], plan[i][2]) for i in todo]
    if mode == "one-pass":
        results = _one_pass(jobs, paths, out, device_name)
    elif mode == "parallel":
        results = _parallel(jobs, paths, out, devices or _all_devices())
    else:
        results = [_sequential(label, preset, paths, out, device_name) for label, preset in jobs]
    done.update(zip(todo, results, strict=True))
    console.print(f"trained {len(todo)} runs in {time.perf_counter() - started:.1f}s")

    rows = [{"label": plan[i][0], **plan[i][1], **done[i]} for i in range(len(plan))]
    report(rows, axes, out, preset_name, overrides or {}, seeds=seeds)
    return out


def parse_grid(preset_grid: Mapping[str, Any], cli: Sequence[str]) -> dict[str, list[Any]]:
    """{dotted key: values} from the preset's [sweep] table, then --grid KEY=V1,V2 (which wins)."""
    axes: dict[str, list[Any]] = {}
    for key, values in preset_grid.items():
        axes[SHORT_KEYS.get(key, key)] = list(values) if isinstance(values, (list, tuple)) else [values]
    for item in cli:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise KDError(f"--grid expects KEY=V1,V2,..., got '{item}'")
        axes[SHORT_KEYS.get(key.strip(), key.strip())] = [
            parse_literal(v.strip()) for v in values.split(",") if v.strip()
        ]  # typed: 2 is a number in every report, not the string "2"
    if not axes:
        raise KDError(
            "empty grid: pass --grid KEY=V1,V2 (e.g. --grid temperature=1,2,4) or add a [sweep] table"
        )
    return axes


def _run_dir(out: Path, label: str, preset: Preset) -> Path:
    return out / "runs" / f"{label.replace('/', '_')}-s{preset.distill.seed}"


def _sequential(label: str, preset: Preset, paths: Paths, out: Path, device_name: str) -> dict[str, Any]:
    run_dir = _run_dir(out, label, preset)
    return distill.run(
        preset, paths, run_name=run_dir.name, run_dir=run_dir, device_name=device_name, verbose=False
    )


def _one_pass(
    jobs: list[tuple[str, Preset]], paths: Paths, out: Path, device_name: str
) -> list[dict[str, Any]]:
    """Group runs that differ only in loss settings (same seed, student, data, optimizer) and train each
    group's students together over one stream of batches; multi-phase methods run sequentially."""
    groups: dict[str, list[int]] = {}
    for i, (_, preset) in enumerate(jobs):
        key = f"phases{i}" if len(method_phases(preset.distill)) > 1 else _group_key(preset)
        groups.setdefault(key, []).append(i)
    results: dict[int, dict[str, Any]] = {}
    for members in groups.values():
        if len(members) == 1:
            label, preset = jobs[members[0]]
            results[members[0]] = _sequential(label, preset, paths, out, device_name)
            continue
        results.update(_train_together(members, jobs, paths, out, device_name))
    return [results[i] for i in range(len(jobs))]


def _train_together(
    members: list[int], jobs: list[tuple[str, Preset]], paths: Paths, out: Path, device_name: str
) -> dict[int, dict[str, Any]]:
    """One pass over the batches for the students `members` of `jobs` (torch.func, see fit_many)."""
    results: dict[int, dict[str, Any]] = {}
    presets = [jobs[i][1] for i in members]
    # the cache and batches are the same for all: take the first member needing the teacher, if any
    lead = next((p for p in presets if p.distill.method != "ce"), presets[0])
    for i, p in zip(members, presets, strict=True):  # before any work, as distill.run does
        check_run_folder(_run_dir(out, jobs[i][0], p), p)
    device = pick_device(device_name)
    data = prepare(lead, paths, cache=None, device=device)
    models = []
    for preset in presets:
        torch.manual_seed(preset.distill.seed)  # as distill.run: the same initial weights
        models.append(build_model(preset.student, data.train.num_classes, data.train.input_shape))
    generator = seed_everything(lead.distill.seed)
    plans = [phases(p.distill)[0] for p in presets]
    recorders = [
        RunRecorder(
            _run_dir(out, jobs[i][0], p),
            _run_dir(out, jobs[i][0], p).name,
            p,
            data,
            mode=f"one-pass x{len(members)}",
        )
        for i, p in zip(members, presets, strict=True)
    ]
    console.print(
        f"one pass: {len(members)} students ({', '.join(jobs[i][0] for i in members)}), "
        f"seed {lead.distill.seed}"
    )
    fits = fit_many(
        models,
        lead.distill.train,
        batches=lambda epoch: data.batches.epoch(generator),
        loss_at=[phase.loss_at for phase in plans],
        val=data.val,
        test=data.test_set,
        device=device,
        on_epoch=lambda i, model, record, improved: recorders[i].log_epoch(
            plans[i], 0, "checkpoint", model, record, improved
        ),
    )
    for i, recorder, result in zip(members, recorders, fits, strict=True):
        results[i] = recorder.finish(result, result.seconds)
    return results


def _group_key(preset: Preset) -> str:
    d = preset.to_dict()
    for key in LOSS_ONLY:
        d["distill"].pop(key, None)
    return json.dumps(d, sort_keys=True)


def _all_devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def _parallel(
    jobs: list[tuple[str, Preset]], paths: Paths, out: Path, devices: Sequence[str]
) -> list[dict[str, Any]]:
    """One worker process per device; each takes the next run from the queue."""
    if not jobs:
        return []
    ctx = torch.multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    for device in devices:
        slots.put(device)
    with ProcessPoolExecutor(
        max_workers=len(devices), mp_context=ctx, initializer=_claim_device, initargs=(slots,)
    ) as pool:
        futures = [pool.submit(_worker_run, label, preset.to_dict(), paths, out) for label, preset in jobs]
        return [f.result() for f in futures]


_worker_device = "cpu"


def _claim_device(slots: Any) -> None:
    global _worker_device
    _worker_device = slots.get()
    if _worker_device == "cpu":  # CPU workers share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))


def _worker_run(label: str, preset_dict: dict[str, Any], paths: Paths, out: Path) -> dict[str, Any]:
    from pipeline.config import preset_from_dict

    preset = preset_from_dict(preset_dict)
    return _sequential(label, preset, paths, out, _worker_device)


def reproduce(
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    axes: Mapping[str, list[Any]],
    out: Path,
    preset_name: str,
    overrides: Mapping[str, Any],
    seeds: int,
) -> list[dict[str, Any]]:
    """Each run of the best combination with the command that reproduces its numbers: `kd distill` for a
    run trained alone; for a run trained in one pass with others (whose floating-point path differs
    from a lone run's), the one-pass sweep that trained it, into a new folder."""
    sets = " ".join(f"--set {k}={_arg(v)}" for k, v in overrides.items())
    alone = " ".join(f"--set {k}={_arg(v)}" for k, v in {**overrides, **best["combo"]}.items())
    grid = " ".join(f"--grid {k}={','.join(_arg(v) for v in values)}" for k, values in axes.items())
    metric = METRICS[best["metric"]]
    runs = []
    for r in (r for r in rows if r["label"] == best["label"]):
        one_pass = str(r.get("mode", "")).startswith("one-pass")
        command = (
            f"kd sweep --preset {preset_name} {grid} {sets} --seeds {seeds} --mode one-pass "
            f"--name {out.name}-repro"
            if one_pass
            else f"kd distill --preset {preset_name} {alone} --seed {r['seed']}"
        )
        runs.append(
            {
                "seed": r["seed"],
                "mode": r.get("mode", "sequential"),
                "metric": metric.name,
                f"student_val_{metric.name}": r[f"student_val_{metric.name}"],
                f"student_test_{metric.name}": r[f"student_test_{metric.name}"],
                "command": " ".join(command.split()),
                "run_dir": r["run_dir"],
            }
        )
    return runs


def reproduce_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The same lines in results.md and on the console."""
    return [
        f"seed {r['seed']} ({r['mode']}): val {METRICS[r['metric']].shown(r, 'val'):.2f}, test "
        f"{METRICS[r['metric']].shown(r, 'test'):.2f}{'' if r['metric'] == 'accuracy' else ' perplexity'}: "
        f"`{r['command']}`"
        + (
            f" (students of this sweep's seed {r['seed']} trained together: the sweep reproduces the "
            "numbers; `kd distill` with the same settings trains alone, a different floating-point path)"
            if r["mode"].startswith("one-pass")
            else ""
        )
        for r in runs
    ]


def _arg(value: Any) -> str:
    text = value if isinstance(value, str) else strict_json.dumps(value)
    return f"'{text}'" if any(c in text for c in " {}[]\"'") else text


def report(
    rows: list[dict[str, Any]],
    axes: Mapping[str, list[Any]],
    out: Path,
    preset_name: str,
    overrides: Mapping[str, Any],
    seeds: int = 1,
) -> None:
    """results.csv, results.md, plots and best.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(axes)
    metric = metric_of(rows[0])
    columns = [
        "label",
        *keys,
        "method",
        "seed",
        f"student_val_{metric.name}",
        f"student_test_{metric.name}",
        "best_epoch",
        "wall_time_s",
        "run_dir",
    ]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    combos = aggregate(rows)
    for combo in combos:
        first = next(r for r in rows if r["label"] == combo["label"])
        combo["combo"] = {k: first[k] for k in keys if k in first}  # axes its method ignores are absent
    combos = metric.best_first(combos, "val_mean")
    best = combos[0]
    runs = reproduce(rows, best, axes, out, preset_name, overrides, seeds)
    (out / "best.json").write_text(
        strict_json.dumps({"best": best, "runs": runs, "command": runs[0]["command"]}, indent=2) + "\n"
    )

    plots = plot_sweep(combos, keys, out)
    lines = [
        f"# Sweep `{out.name}`",
        "",
        f"Best by mean validation {metric.name}: **{best['label']}** — val {mean_std(best, 'val')}, test "
        f"{mean_std(best, 'test')} ({best['seeds']} seed{'s' if best['seeds'] > 1 else ''}). Each run, and "
        "the command that reproduces its numbers:",
        "",
        *[f"- {line}" for line in reproduce_lines(runs)],
        "",
        f"| combination | val {metric.header} | test {metric.header} | val {metric.header} per seed | wall "
        "time / run |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['label']} | {mean_std(c, 'val')} | {mean_std(c, 'test')} | {per_seed(c, 'val')} | "
        f"{c['wall_time_s']:.1f} s |"
        for c in combos
    ]
    lines += outlier_notes(combos)
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "results.md").write_text("\n".join(lines))

    unit = "%" if metric.name == "accuracy" else "ppl"
    table = Table(title=f"sweep {out.name} (sorted by validation {metric.name})")
    for column in ("combination", f"val {unit}", f"test {unit}", f"val {unit} per seed", "time/run"):
        table.add_column(
            column, justify="left" if column in ("combination", f"val {unit} per seed") else "right"
        )
    for c in combos:
        table.add_row(
            c["label"],
            mean_std(c, "val"),
            mean_std(c, "test"),
            per_seed(c, "val", mark=lambda t: f"[bold red]{t}[/bold red]"),
            f"{c['wall_time_s']:.1f}s",
        )
    table_console().print(table)
    Console(soft_wrap=True).print(f"best: {best['label']}", highlight=False)
    for line in reproduce_lines(runs):
        Console(soft_wrap=True).print(f"  {line}", highlight=False, markup=False)
    console.print(f"report: {out}/results.md, results.csv, best.json" + "".join(f", {p.name}" for p in plots))


def _short(key: str) -> str:
    return next((short for short, dotted in SHORT_KEYS.items() if dotted == key and short != "T"), key)
