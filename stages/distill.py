"""Stage 2: train a student against cached teacher logits; the teacher itself is never loaded.

    kd distill --preset mnist1d --method kd --temperature 4 --alpha 0.9     # = make distill T=4 ALPHA=0.9
    kd distill --preset mnist1d --method ce                                 # scratch baseline, same loop

Temperature, alpha and label smoothing act on the raw cached logits as batches load, so changing them
never touches the cache. Checkpoints are selected on a validation split carved from train; the test
split is only reported. Writes data/runs/<run-name>/: config.json, metrics.jsonl, checkpoint/,
curves.png, summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline import strict_json
from pipeline.augment import AugmentSpec, check_augment
from pipeline.batches import (
    InMemoryBatches,
    OnlineBatches,
    StreamedBatches,
    Views,
    cached_logits_for,
    cached_views_for,
)
from pipeline.config import DistillConfig, OptimConfig, Paths, Preset, changed_settings
from pipeline.datasets import Split, load_split, validation_rows
from pipeline.discovery import find_train_cache
from pipeline.distributed import barrier, device_for, init, total
from pipeline.errors import DivergedError, KDError
from pipeline.far_cache import fits_in_memory
from pipeline.losses import LOSSES
from pipeline.methods import (
    LABEL_ONLY,
    annealed_temperature,
    method,
    method_label,
    method_settings,
    settings_at,
    soft_settings,
)
from pipeline.methods import phases as method_phases
from pipeline.models import (
    architecture_record,
    build_model,
    check_fits_data,
    online_teacher,
    save_checkpoint,
    teacher_autocast,
)
from pipeline.plots import plot_curves
from pipeline.runs import check_run_folder, default_run_name, describe
from pipeline.store import LogitStore, find_caches
from pipeline.train import EpochRecord, accuracy, fit, pick_device, predict, seed_everything

console = Console(stderr=True, soft_wrap=True)


def run(
    preset: Preset,
    paths: Paths,
    *,
    cache: str | Path | None = None,
    run_name: str | None = None,
    run_dir: Path | None = None,
    device_name: str = "auto",
    verbose: bool = True,
    source: str | None = None,
) -> dict[str, Any]:
    """Train one student; `source` (the preset's name or path) lets the run name and summary say which
    settings differ from the preset file."""
    cfg = preset.distill
    changes = changed_settings(preset, source) if source else {}
    name = run_name or default_run_name(preset, changes)
    folder_of_run = run_dir or paths.runs / name
    check_run_folder(folder_of_run, preset)  # before any work: never replace another run's folder
    if preset.dataset.name == "lm-text":  # language models: token sequences, perplexity
        from stages import distill_lm

        return distill_lm.run(preset, paths, cache, name, folder_of_run, device_name, verbose, changes)
    picked = pick_device(device_name)
    ranks = init(picked)
    device = device_for(ranks, picked)
    generator = seed_everything(cfg.seed)  # the same on every rank: same init, same global batches
    data = prepare(preset, paths, cache=cache, device=device)
    student = build_model(preset.student, data.train.num_classes, data.train.input_shape)
    check_fits_data(student, data.train, "student", preset.student.arch)
    student = student.to(device)
    model: torch.nn.Module = student
    if ranks.active:
        data.batches.shard(ranks.rank, ranks.world)
        if isinstance(data.batches, StreamedBatches):
            data.source += f", shards partitioned across {ranks.world} processes"
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    recorder = (
        RunRecorder(
            folder_of_run,
            name,
            preset,
            data,
            mode=f"ddp x{ranks.world}" if ranks.active else "sequential",
            changes=changes,
        )
        if ranks.is_main
        else None
    )
    if verbose and ranks.is_main:
        console.print(
            f"distilling {preset.student.arch} with '{cfg.method}' from {data.source}"
            f"{'' if data.store is None else ' ' + data.store.where} on {device}"
            f"{f' x {ranks.world} processes (DDP)' if ranks.active else ''}",
            highlight=False,
        )
        if changes:
            console.print(f"settings changed from the preset: {describe(changes)}", highlight=False)
        if data.approximation:
            console.print(f"note: {data.approximation}", highlight=False)
    offset, seconds = 0, 0.0
    plan = phases(cfg)
    for i, phase in enumerate(plan):
        # the last phase's best is the run's checkpoint; earlier phases keep their own
        folder = "checkpoint" if i == len(plan) - 1 else f"checkpoint-{phase.name}"
        # fit() starts a fresh optimizer and LR schedule and ends with the phase's best weights loaded,
        # so a following phase starts from the best checkpoint of the one before
        try:
            result = fit(
                model,
                phase.optim,
                batches=lambda epoch: data.batches.epoch(generator),
                loss_at=lambda epoch, phase=phase: phase.loss_at(epoch),
                val=data.val,
                test=data.test_set,
                device=device,
                on_epoch=functools.partial(recorder.log_epoch, phase, offset, folder, student)
                if recorder
                else None,
                desc=phase.name,
                progress=ranks.is_main,  # one progress bar or line per run, not one per process
            )
        except DivergedError as err:
            used = describe({**_numbers(phase.settings(err.epoch - 1)), "lr": phase.optim.lr})
            raise DivergedError(err.epoch + offset, err.loss, f" ({phase.name})", used) from None
        best_epoch = result.best_epoch + offset
        offset += phase.optim.epochs
        seconds += result.seconds
    barrier(ranks)
    # logits read from the cache by every rank together: with shards partitioned, one copy an epoch
    read = total(ranks, data.store.logit_bytes_read if data.store is not None else 0)
    if recorder is None:  # metrics, checkpoints and the summary come from rank 0
        return {}
    summary = recorder.finish(best_epoch, result.best_val_accuracy, result.test_accuracy, seconds, read)
    if verbose:
        print_summary(summary)
    return summary


@dataclass
class Prepared:
    """The data side of a run, shared by every student trained on the same stream of batches."""

    train: Split
    test: Split
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    store: LogitStore | None
    teacher_test_accuracy: float | None
    batches: InMemoryBatches | StreamedBatches | OnlineBatches
    source: str  # where the teacher side comes from, for config.json and the console
    device: torch.device
    views: str = "none"  # what the student's inputs are, against what targets (config.json "views")
    teacher_name: str | None = None
    approximation: str | None = None  # how a top-k cache's missing logits are filled in (config.json)

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train.inputs[self.val_rows], self.train.labels[self.val_rows]

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test.inputs, self.test.labels


def prepare(preset: Preset, paths: Paths, *, cache: str | Path | None, device: torch.device) -> Prepared:
    """Data, validation carve, the checked cache and the batch source for `preset.distill`."""
    cfg = preset.distill
    train, test = load_split(preset.dataset, "train"), load_split(preset.dataset, "test")
    check_augment(cfg.train.augment, train.inputs)
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)
    fresh = Views(AugmentSpec(cfg.train.augment, cfg.train.augment_pad), choice=cfg.views, seed=cfg.seed)
    views = "none" if fresh.spec.kind == "none" else f"fresh {fresh.spec.kind} (pad {fresh.spec.pad})"
    if cfg.teacher_online and cfg.method not in LABEL_ONLY:
        teacher, name = online_teacher(preset, paths, train, device)
        batches = OnlineBatches(
            InMemoryBatches(train, train_rows, None, cfg.train.batch_size, device, fresh),
            teacher,
            preset.cache.precision,  # the precision stage 1 would run the teacher in
        )
        with torch.no_grad(), teacher_autocast(device, preset.cache.precision):
            teacher_test = accuracy(predict(teacher, test.inputs, device), test.labels)
        views += ", teacher run on the same views (online)"
        return Prepared(
            train,
            test,
            train_rows,
            val_rows,
            None,
            teacher_test,
            batches,
            "teacher online",
            device,
            views,
            name,
        )
    store = find_train_cache(preset, paths, train, cache, required=cfg.method not in LABEL_ONLY)
    batches: InMemoryBatches | StreamedBatches
    if cfg.method in LABEL_ONLY:
        source = "labels"
        batches = InMemoryBatches(train, train_rows, None, cfg.train.batch_size, device, fresh)
    else:
        assert store is not None
        fresh, views = _student_views(store, train, cfg, fresh, views)
        if fits_in_memory(store, cfg):
            source = "cache in memory"
            if store.manifest.views:
                fresh = dataclasses.replace(fresh, params=cached_views_for(store, train))
            logits = cached_logits_for(store, train)
            batches = InMemoryBatches(train, train_rows, logits, cfg.train.batch_size, device, fresh)
        else:
            source = "cache streamed (shard-shuffled)"
            batches = StreamedBatches(store, train, train_rows, cfg.train.batch_size, device, views=fresh)
    return Prepared(
        train,
        test,
        train_rows,
        val_rows,
        store,
        _teacher_test_accuracy(store, test, paths.remote, paths.logits),
        batches,
        source,
        device,
        views,
        store.manifest.teacher.name if store else None,
        _topk_approximation(store, cfg) if store is not None and cfg.method not in LABEL_ONLY else None,
    )


def _topk_approximation(store: LogitStore, cfg: DistillConfig) -> str | None:
    """What a top-k classification cache gives every method in place of the missing logits (None for a
    cache of every logit); refused with distill.sparse_exact, which asks for exact targets."""
    sparse = store.manifest.sparse
    if not sparse or sparse["k"] >= sparse["vocab"]:
        return None
    t0, what = sparse["lse_temperatures"][0], f"top-{sparse['k']} cache of {sparse['vocab']} classes"
    if cfg.sparse_exact:
        raise KDError(
            f"cache {store.where} is a {what} and distill.sparse_exact = true asks for exact targets: "
            f"rebuild it with --set cache.topk={sparse['vocab']} (or dense), or set "
            "distill.sparse_exact=false"
        )
    text = (
        f"{what}: the missing logits are rebuilt by the uniform tail (all equal, keeping the tail's mass at "
        f"T = {t0:g} exact), an approximation of the teacher's tail at every temperature"
    )
    return text


def _student_views(
    store: LogitStore, train: Split, cfg: DistillConfig, fresh: Views, views: str
) -> tuple[Views, str]:
    """The student's augmentation with this cache: its stored views replayed (train.augment must be none
    or the same kind), or fresh views against the fixed view's targets (a warning: they differ)."""
    if not store.manifest.views:
        if fresh.spec.kind != "none":
            console.print(
                f"warning: the cache holds the teacher's logits of the fixed view but the student trains on "
                f"fresh {fresh.spec.kind} views, so targets and inputs differ; a view cache matches them "
                '(cache.augment, cache.views; README "Augmented views")',
                highlight=False,
            )
            views += " vs the fixed view's targets"
        return fresh, views
    spec = store.augment  # refused here when this version cannot replay the cache's views
    if cfg.train.augment not in ("none", spec.kind) or (
        cfg.train.augment == spec.kind and cfg.train.augment_pad != spec.pad
    ):
        raise KDError(
            f"the cache holds {spec.kind} views (pad {spec.pad}) but distill.train.augment is "
            f"{cfg.train.augment} (pad {cfg.train.augment_pad}): the student replays the cached views, so "
            f'set distill.train.augment to "{spec.kind}" or "none", or use a cache of the views you want'
        )
    check_augment(spec.kind, train.inputs)
    count = store.num_views
    all_views = " (all)" if store.manifest.views.get("all") else ""
    return (
        Views(spec, None, cfg.views, cfg.seed),
        f"cached: {count}{all_views} {spec.kind} views (pad {spec.pad}), one per row per epoch ({cfg.views})",
    )


class RunRecorder:
    """Writes one run folder as it trains: config.json, metrics.jsonl, checkpoint/, curves.png and,
    when done, summary.json."""

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
            "approximation": data.approximation,  # a top-k cache's rebuilt logits (None: every logit stored)
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
        settings = _numbers(phase.settings(record.epoch - 1))  # the schedule values this epoch used
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
            info = {
                "run_name": self.name,
                "phase": phase.name,
                "epoch": record.epoch,
                "val_accuracy": record.val_accuracy,
            }
            save_checkpoint(self.run_dir / folder, model, self.arch, info)

    def finish(
        self,
        best_epoch: int,
        val_accuracy: float,
        test_accuracy: float | None,
        seconds: float,
        cache_bytes_read: int = 0,
    ) -> dict[str, Any]:
        cfg, store = self.preset.distill, self.data.store
        soft = soft_settings(cfg)
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
            "best_epoch": best_epoch,
            "student_val_accuracy": val_accuracy,
            "student_test_accuracy": test_accuracy,
            "teacher_test_accuracy": self.data.teacher_test_accuracy,
            "teacher": self.data.teacher_name,
            "views": self.data.views,
            "cache": store.where if store else None,
            "device": str(self.data.device),
            "wall_time_s": round(seconds, 2),
            "cache_bytes_read": cache_bytes_read,  # stored logits read, every process together
            "run_dir": str(self.run_dir),
        }
        plot_curves(
            self.history,
            self.run_dir / "curves.png",
            title=self.name,
            best_epoch=best_epoch,
            teacher_test=self.data.teacher_test_accuracy,
            phase_starts=self.phase_starts,
        )
        (self.run_dir / "summary.json").write_text(strict_json.dumps(summary, indent=2) + "\n")
        return summary


@dataclass(frozen=True)
class Phase:
    name: str
    loss: str  # a LOSSES key
    optim: OptimConfig
    settings: Callable[[int], dict[str, Any]]  # epoch in the phase (0-based) -> the loss's keyword arguments
    method: str = ""  # the method record it trains (pipeline.methods): Annealing-KD's phase 2 is "ce"

    def loss_at(self, epoch: int) -> Callable[..., torch.Tensor]:
        """The phase's loss with this epoch's settings bound."""
        return functools.partial(LOSSES[self.loss], **self.settings(epoch))


def phases(cfg: DistillConfig) -> list[Phase]:
    """The training phases of the method (pipeline.methods), each with its loss's settings per epoch."""
    return [
        Phase(
            plan.name,
            method(plan.method).loss_name,
            plan.optim,
            functools.partial(settings_at, cfg, plan.method),
            plan.method,
        )
        for plan in method_phases(cfg)
    ]


def _numbers(settings: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in settings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _teacher_test_accuracy(
    store: LogitStore | None, test: Split, remote: str | None = None, local: Path | None = None
) -> float | None:
    """The same teacher's accuracy on the test split, from the test cache's manifest (no data read):
    found beside the train cache, else among the local caches (a train cache pushed or pulled alone)."""
    if store is None:
        return None
    roots = [remote or Path(store.where).parent, *([local] if local is not None else [])]
    for root in dict.fromkeys(str(r) for r in roots):
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

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:g}"

    weights = summary["method_settings"] if "kd_weight" in summary["method_settings"] else None
    table.add_row(
        summary.get("method_label", summary["method"]),
        number(summary["temperature"]),
        f"CE {weights['ce_weight']:g} + KD {weights['kd_weight']:g}" if weights else number(summary["alpha"]),
        str(summary["epochs"]),
        str(summary["best_epoch"]),
        pct(summary["student_val_accuracy"]),
        pct(summary["student_test_accuracy"]),
        pct(summary["teacher_test_accuracy"]),
        f"{summary['wall_time_s']:.1f}s",
    )
    Console().print(table)
    Console(soft_wrap=True).print(f"outputs: {summary['run_dir']}")
