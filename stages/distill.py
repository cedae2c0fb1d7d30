"""Stage 2: train a student (a classifier or a language model) against cached teacher logits; the
teacher itself is never loaded.

    kd distill --preset mnist1d --method kd --temperature 4 --alpha 0.9     # = make distill T=4 ALPHA=0.9
    kd distill --preset mnist1d --method ce                                 # scratch baseline, same loop

Temperature, alpha and label smoothing act on the raw cached logits as batches load, so changing them
never touches the cache. Checkpoints are selected on a validation split carved from train; the test
split is only reported. A language model (dataset lm-text) trains on next tokens from a sparse cache
and is scored by perplexity. Writes data/runs/<run-name>/: config.json, metrics.jsonl, checkpoint/,
curves.png, summary.json (pipeline.runs.recorder); the data side is pipeline.distill.student_data's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.config import Paths, Preset, changed_settings
from pipeline.distill.batches import StreamedBatches
from pipeline.distill.phases import numbers, phases
from pipeline.distill.student_data import prepare
from pipeline.errors import DivergedError
from pipeline.models import build_model, check_fits_data
from pipeline.runs.identity import check_run_folder, default_run_name, describe
from pipeline.runs.recorder import RunRecorder, print_summary
from pipeline.training.distributed import barrier, device_for, init, total
from pipeline.training.loop import fit, pick_device, seed_everything

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
    """Train one student, a classifier or a language model; `source` (the preset's name or path) lets
    the run name and summary say which settings differ from the preset file."""
    cfg = preset.distill
    changes = changed_settings(preset, source) if source else {}
    name = run_name or default_run_name(preset, changes)
    folder_of_run = run_dir or paths.runs / name
    check_run_folder(folder_of_run, preset)  # before any work: never replace another run's folder
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
    mode = f"ddp x{ranks.world}" if ranks.active else "sequential"
    recorder = RunRecorder(folder_of_run, name, preset, data, mode, changes) if ranks.is_main else None
    if verbose and ranks.is_main:
        console.print(
            f"distilling {preset.student.arch} with '{cfg.method}' from {data.source}"
            f"{'' if data.store is None else ' ' + data.store.where} on {device}"
            f"{f' x {ranks.world} processes (DDP)' if ranks.active else ''}",
            highlight=False,
        )
        if data.train.reading:
            console.print(data.train.reading, highlight=False)
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
                task=data.task,
                on_epoch=functools.partial(recorder.log_epoch, phase, offset, folder, student)
                if recorder
                else None,
                desc=phase.name,
                progress=ranks.is_main,  # one progress bar or line per run, not one per process
            )
        except DivergedError as err:
            used = describe({**numbers(phase.settings(err.epoch - 1)), "lr": phase.optim.lr})
            raise DivergedError(err.epoch + offset, err.loss, f" ({phase.name})", used) from None
        best_epoch = result.best_epoch + offset
        offset += phase.optim.epochs
        seconds += result.seconds
    barrier(ranks)
    # logits read from the cache by every rank together: with shards partitioned, one copy an epoch
    read = total(ranks, data.store.logit_bytes_read if data.store is not None else 0)
    if recorder is None:  # metrics, checkpoints and the summary come from rank 0
        return {}
    summary = recorder.finish(result, seconds, read, best_epoch)
    if verbose:
        print_summary(summary)
    return summary
