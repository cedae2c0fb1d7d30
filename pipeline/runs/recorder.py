"""One writer of a student's run folder, for classifiers and language models alike: config.json before
training, metrics.jsonl and checkpoint/ as it trains, curves.png and summary.json when done (a run is
finished only once summary.json is back).

    recorder = RunRecorder(folder, name, preset, data)          # data: pipeline.distill.student_data.Prepared
    fit(..., on_epoch=functools.partial(recorder.log_epoch, phase, 0, "checkpoint", model))
    summary = recorder.finish(result, seconds)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline import strict_json
from pipeline.config import Preset
from pipeline.distill.methods import annealed_temperature, method_label, method_settings, soft_settings
from pipeline.distill.phases import Phase, numbers
from pipeline.distill.student_data import Prepared
from pipeline.models import architecture_record, save_checkpoint
from pipeline.runs.identity import check_run_folder
from pipeline.runs.plots import plot_curves, plot_sequence_curves
from pipeline.training.loop import CLASSES, EpochRecord, FitResult


class RunRecorder:
    """Writes one run folder as it trains (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        preset: Preset,
        data: Prepared,
        mode: str = "sequential",
        changes: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir, self.name, self.preset, self.data = run_dir, name, preset, data
        self.changes = dict(changes or {})
        self.mode = mode
        self.history: list[EpochRecord] = []
        self.phase_starts: list[tuple[int, str]] = []  # (first epoch, phase name) of every phase
        self.arch = architecture_record(preset.student, data.train.num_classes, data.train.input_shape)
        key = data.store.manifest.key if data.store else None
        check_run_folder(run_dir, preset, key)  # again, now that the cache is known
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "preset": preset.to_dict(),
            "run_name": name,
            "cache": data.store.where if data.store else None,
            "cache_key": key,  # the logits it learnt from: a rerun from another cache keeps out
            "device": str(data.device),
            "batches": data.source,
            "mode": mode,
            "changed_settings": self.changes,
            "views": data.views,  # the student's inputs, and whether the targets are of the same views
            "approximation": data.approximation,  # missing teacher logits filled in (None: every one stored)
            **data.config,
        }
        (run_dir / "config.json").write_text(strict_json.dumps(config, indent=2) + "\n")
        (run_dir / "summary.json").unlink(missing_ok=True)  # a run is finished only once this is back
        self.metrics = run_dir / "metrics.jsonl"
        self.metrics.write_text("")

    def log_epoch(
        self,
        phase: Phase,
        offset: int,
        folder: str,
        model: torch.nn.Module,
        record: EpochRecord,
        improved: bool,
    ) -> None:
        settings = numbers(phase.settings(record.epoch - 1))  # the schedule values this epoch used
        temperature = annealed_temperature(self.preset.distill, phase.method, record.epoch - 1)
        if temperature is not None:
            settings["temperature"] = temperature  # Annealing's / Continuation's integer T behind phi
        record = dataclasses.replace(record, epoch=record.epoch + offset)
        if not self.phase_starts or self.phase_starts[-1][1] != phase.name:
            self.phase_starts.append((record.epoch, phase.name))
        self.history.append(record)
        with self.metrics.open("a") as f:
            f.write(strict_json.dumps({"phase": phase.name, **record.line(), **settings}) + "\n")
        if improved:
            metric = self.data.task.metric
            info = {"run_name": self.name, "phase": phase.name, "epoch": record.epoch}
            info[f"val_{metric}"] = record.val[metric]
            save_checkpoint(self.run_dir / folder, model, self.arch, info)

    def finish(
        self, result: FitResult, seconds: float, cache_bytes_read: int = 0, best_epoch: int | None = None
    ) -> dict[str, Any]:
        """summary.json and curves.png of the run; `result` is its last phase's (`best_epoch`: counted
        over every phase, default the result's)."""
        cfg, store, task = self.preset.distill, self.data.store, self.data.task
        best = result.best_epoch if best_epoch is None else best_epoch
        soft = soft_settings(cfg)
        tested = result.test or dict.fromkeys(result.best_val)
        summary = {
            "run_name": self.name,
            "preset": self.preset.name,
            "method": cfg.method,
            "method_label": method_label(cfg),
            "temperature": soft.get("temperature"),  # None: the method does not use it
            "alpha": soft.get("alpha"),
            "label_smoothing": cfg.label_smoothing,
            "standardize": cfg.standardize,
            "method_settings": method_settings(cfg),
            "changed_settings": self.changes,  # what differs from the preset file
            "seed": cfg.seed,
            "mode": self.mode,  # sequential, one-pass xN (trained with N-1 others) or ddp xW
            "epochs": cfg.train.epochs,
            "lr": cfg.train.lr,
            "best_epoch": best,
            f"student_val_{task.metric}": result.best_val[task.metric],
            **{f"student_test_{k}": v for k, v in tested.items()},
            f"teacher_test_{task.metric}": self.data.teacher_test,
            "teacher": self.data.teacher_name,
            "views": self.data.views,
            "cache": store.where if store else None,
            "device": str(self.data.device),
            "wall_time_s": round(seconds, 2),
            "cache_bytes_read": cache_bytes_read,  # stored logits read, every process together
            "run_dir": str(self.run_dir),
            **self.data.summary,
        }
        if task is not CLASSES:
            summary["step_seconds"] = result.step_seconds  # the median training step
            plot_sequence_curves(
                self.history, self.run_dir / "curves.png", self.name, best, self.data.teacher_test
            )
        else:
            plot_curves(
                self.history,
                self.run_dir / "curves.png",
                title=self.name,
                best_epoch=best,
                teacher_test=self.data.teacher_test,
                phase_starts=self.phase_starts,
            )
        (self.run_dir / "summary.json").write_text(strict_json.dumps(summary, indent=2) + "\n")
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The run's one-row table on stdout (accuracies in %, perplexities as they are), then its folder."""
    sequences = "student_val_perplexity" in summary
    metric = "perplexity" if sequences else "accuracy"
    table = Table(title=f"run {summary['run_name']}")
    scores = ("val", "test", "teacher test")
    for column in ("method", "T", "alpha", "epochs", "best", *scores, "time"):
        table.add_column(f"{column} ppl" if sequences and column in scores else column, justify="right")

    def shown(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{x:.2f}" if sequences else f"{100 * x:.2f}%"

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:g}"

    settings = summary.get("method_settings") or {}
    weights = settings if "kd_weight" in settings else None
    table.add_row(
        summary.get("method_label", summary["method"]),
        number(summary["temperature"]),
        f"CE {weights['ce_weight']:g} + KD {weights['kd_weight']:g}" if weights else number(summary["alpha"]),
        str(summary["epochs"]),
        str(summary["best_epoch"]),
        shown(summary[f"student_val_{metric}"]),
        shown(summary[f"student_test_{metric}"]),
        shown(summary[f"teacher_test_{metric}"]),
        f"{summary['wall_time_s']:.1f}s",
    )
    Console().print(table)
    if sequences:
        Console(soft_wrap=True).print(
            f"test perplexity {summary['student_test_perplexity']:.2f} "
            f"(token accuracy {summary['student_test_token_accuracy']:.2%})",
            highlight=False,
        )
    Console(soft_wrap=True).print(f"outputs: {summary['run_dir']}")
