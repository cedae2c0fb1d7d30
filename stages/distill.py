"""Stage 2: train a student against cached teacher logits; the teacher itself is never loaded.

    kd distill --preset mnist1d --method kd --temperature 4 --alpha 0.9     # = make distill T=4 ALPHA=0.9
    kd distill --preset mnist1d --method ce                                 # scratch baseline, same loop

Temperature, alpha and label smoothing act on the raw cached logits as batches load, so changing them
never touches the cache. Checkpoints are selected on a validation split carved from train; the test
split is only reported. Writes data/runs/<run-name>/: config.json, metrics.jsonl, checkpoint/,
curves.png, summary.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.batches import InMemoryBatches, StreamedBatches, cached_logits_for
from pipeline.config import DistillConfig, Paths, Preset
from pipeline.datasets import Split, load_split, validation_rows
from pipeline.errors import KDError
from pipeline.losses import LABEL_ONLY, LOSSES
from pipeline.models import architecture_record, build_model, save_checkpoint
from pipeline.plots import plot_curves
from pipeline.store import LogitStore, find_caches
from pipeline.train import BatchLoss, EpochRecord, fit, pick_device, seed_everything

console = Console(stderr=True)


def run(
    preset: Preset,
    paths: Paths,
    *,
    cache: Path | None = None,
    run_name: str | None = None,
    device_name: str = "auto",
) -> dict[str, Any]:
    cfg = preset.distill
    device = pick_device(device_name)
    generator = seed_everything(cfg.seed)
    train, test = load_split(preset.dataset, "train"), load_split(preset.dataset, "test")
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)

    store = _open_cache(preset, paths, train, cache, required=cfg.method not in LABEL_ONLY)
    teacher_test_accuracy = _teacher_test_accuracy(store, test)

    if cfg.method in LABEL_ONLY:
        source = "labels"
        batches: InMemoryBatches | StreamedBatches = InMemoryBatches(
            train, train_rows, None, cfg.train.batch_size, device
        )
    elif store.num_rows * store.num_classes * 4 <= cfg.memory_budget_mb * 2**20:
        source = "cache in memory"
        batches = InMemoryBatches(
            train, train_rows, cached_logits_for(store, train), cfg.train.batch_size, device
        )
    else:
        source = "cache streamed (chunk-shuffled)"
        batches = StreamedBatches(store, train, train_rows, cfg.train.batch_size, device)

    student = build_model(preset.student, train.num_classes, train.input_shape)
    name = run_name or default_run_name(preset)
    run_dir = paths.runs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "preset": preset.to_dict(),
        "run_name": name,
        "cache": store.where if store else None,
        "device": str(device),
        "batches": source,
        "note": "teacher logits are for the fixed (un-augmented) inputs, as cached",
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    arch = architecture_record(preset.student, train.num_classes, train.input_shape)

    def on_epoch(record: EpochRecord, improved: bool) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record.__dict__) + "\n")
        if improved:
            save_checkpoint(
                run_dir / "checkpoint",
                student,
                arch,
                {"run_name": name, "epoch": record.epoch, "val_accuracy": record.val_accuracy},
            )

    console.print(
        f"distilling {preset.student.arch} with '{cfg.method}' from {source}"
        f"{'' if store is None else ' ' + store.where} on {device}"
    )
    result = fit(
        student,
        cfg.train,
        batches=lambda epoch: batches.epoch(generator),
        loss_at=lambda epoch: loss_at(cfg, epoch),
        val=(train.inputs[val_rows], train.labels[val_rows]),
        test=(test.inputs, test.labels),
        device=device,
        on_epoch=on_epoch,
        desc=cfg.method,
    )
    summary = {
        "run_name": name,
        "preset": preset.name,
        "method": cfg.method,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "label_smoothing": cfg.label_smoothing,
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "best_epoch": result.best_epoch,
        "student_val_accuracy": result.best_val_accuracy,
        "student_test_accuracy": result.test_accuracy,
        "teacher_test_accuracy": teacher_test_accuracy,
        "teacher": store.manifest.teacher.name if store else None,
        "cache": store.where if store else None,
        "device": str(device),
        "wall_time_s": round(result.seconds, 2),
        "run_dir": str(run_dir),
    }
    plot_curves(result.history, run_dir / "curves.png", title=f"{name}", teacher_test=teacher_test_accuracy)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def loss_at(cfg: DistillConfig, epoch: int) -> BatchLoss:
    """The method's loss with this epoch's settings bound (constant for now; schedules plug in here)."""
    if cfg.method == "ce":
        return functools.partial(LOSSES["ce"], label_smoothing=cfg.label_smoothing)
    return functools.partial(
        LOSSES[cfg.method], temperature=cfg.temperature, alpha=cfg.alpha, label_smoothing=cfg.label_smoothing
    )


def default_run_name(preset: Preset) -> str:
    cfg = preset.distill
    soft = "" if cfg.method in LABEL_ONLY else f"-T{cfg.temperature:g}-a{cfg.alpha:g}"
    return f"{preset.name}-{cfg.method}{soft}-s{cfg.seed}"


def _open_cache(
    preset: Preset, paths: Paths, train: Split, cache: Path | None, *, required: bool
) -> LogitStore | None:
    """The train-split cache: the given path, else the newest complete match under the cache root."""
    if cache is not None:
        store = LogitStore.open(cache)
    else:
        found = find_caches(
            paths.logits, dataset_fingerprint=train.fingerprint, split="train", teacher=preset.teacher.name
        )
        if not found:
            if not required:
                return None
            raise KDError(
                f"no complete train-split cache of teacher '{preset.teacher.name}' for this dataset "
                f"under {paths.logits}: run `kd teacher-logits --preset {preset.name}` "
                "(or `make teacher-logits`), or pass --cache PATH"
            )
        store = found[0]
    store.require_complete()
    check_cache_matches(store, train)
    return store


def check_cache_matches(store: LogitStore, split: Split) -> None:
    """Refuse a cache computed on other data: split, length, fingerprint and class count must agree."""
    d = store.manifest.dataset
    fix = "re-run `kd teacher-logits` for this dataset, or pass the matching --cache"
    if d.split != split.split:
        raise KDError(f"cache {store.where} holds the '{d.split}' split, not '{split.split}': {fix}")
    if d.length != len(split) or store.num_rows != len(split):
        raise KDError(
            f"cache {store.where} has {d.length} rows but the {split.dataset} {split.split} split has "
            f"{len(split)}: {fix}"
        )
    if d.fingerprint != split.fingerprint:
        raise KDError(
            f"cache {store.where} was computed on different data (fingerprint {d.fingerprint[:12]} != "
            f"{split.fingerprint[:12]} of {split.dataset}/{split.split}): {fix}"
        )
    if store.num_classes != split.num_classes:
        raise KDError(
            f"cache {store.where} has {store.num_classes} classes but {split.dataset} has "
            f"{split.num_classes}: {fix}"
        )


def _teacher_test_accuracy(store: LogitStore | None, test: Split) -> float | None:
    if store is None:
        return None
    root = Path(store.where).parent
    for candidate in find_caches(
        root, dataset_fingerprint=test.fingerprint, split="test", teacher=store.manifest.teacher.name
    ):
        if candidate.manifest.teacher.fingerprint == store.manifest.teacher.fingerprint:
            return candidate.manifest.teacher_accuracy
    return None


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run_name']}")
    for column in ("method", "T", "alpha", "epochs", "best", "val", "test", "teacher test", "time"):
        table.add_column(column, justify="right")
    soft = summary["method"] not in LABEL_ONLY

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    table.add_row(
        summary["method"],
        f"{summary['temperature']:g}" if soft else "-",
        f"{summary['alpha']:g}" if soft else "-",
        str(summary["epochs"]),
        str(summary["best_epoch"]),
        pct(summary["student_val_accuracy"]),
        pct(summary["student_test_accuracy"]),
        pct(summary["teacher_test_accuracy"]),
        f"{summary['wall_time_s']:.1f}s",
    )
    Console().print(table)
    Console().print(f"outputs: {summary['run_dir']}")
