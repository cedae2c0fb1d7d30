"""`kd distill` for language models (dataset lm-text): a student GPT trained on next tokens, from a sparse
cache of its teacher (top-k + tail, top-k renormalised, or sampled tokens), from the teacher run online
(dense KD), or from labels alone (ce). Writes the run folder as for classification: config.json,
metrics.jsonl (per epoch: loss, validation perplexity and token accuracy, T and alpha used),
checkpoint/, curves.png, summary.json (perplexities of student and teacher).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline import strict_json
from pipeline.config import Paths, Preset
from pipeline.datasets import load_split, validation_rows
from pipeline.distributed import barrier, device_for, init
from pipeline.errors import KDError
from pipeline.lm import SequenceBatches, StreamedSequences
from pipeline.losses import cross_entropy, hinton_kd
from pipeline.methods import TABLE
from pipeline.models import (
    architecture_record,
    build_model,
    check_fits_data,
    save_checkpoint,
    teacher_autocast,
)
from pipeline.runs import check_run_folder, describe
from pipeline.schedules import alpha_at, temperature_at
from pipeline.store import LogitStore
from pipeline.store.sparse import stored_at
from pipeline.targets import SparseTargets
from pipeline.train import SEQUENCES, EpochRecord, fit, pick_device, score_sequences, seed_everything

console = Console(stderr=True, soft_wrap=True)
LM_METHODS = tuple(name for name, m in TABLE.items() if m.sequences)
APPROXIMATION = (
    "uniform tail: at a temperature with no stored logsumexp, the V - k missing logits are taken equal, "
    "keeping their total mass at the first stored temperature exact"
)


def run(
    preset: Preset,
    paths: Paths,
    cache: str | Path | None,
    name: str,
    folder: Path,
    device_name: str,
    verbose: bool,
    changes: dict[str, Any],
) -> dict[str, Any]:
    cfg = preset.distill
    if cfg.method not in LM_METHODS:
        raise KDError(
            f"method '{cfg.method}' is for classification: a language model trains with "
            f"{' or '.join(LM_METHODS)} (kd from a sparse cache or --online)"
        )
    picked = pick_device(device_name)
    ranks = init(picked)
    device = device_for(ranks, picked)
    generator = seed_everything(cfg.seed)  # the same on every rank: same init, same global batches
    train, test = load_split(preset.dataset, "train"), load_split(preset.dataset, "test")
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)
    temperatures = [temperature_at(e, cfg) for e in range(cfg.train.epochs)]
    bs = cfg.train.batch_size
    store, targets, teacher, teacher_test, source = _teacher_side(preset, paths, cache, train, test, device)
    approximated = unstored_temperatures(store, temperatures) if store is not None else []
    stream = (
        None if store is None or targets is not None else StreamedSequences(store, train.ids, train_rows, bs)
    )
    batches = SequenceBatches(
        train, train_rows, bs, device, targets=targets, stream=stream, teacher=teacher,
        precision=preset.cache.precision,
    )  # fmt: skip
    if ranks.active:
        batches.shard(ranks.rank, ranks.world)

    student = build_model(preset.student, train.num_classes, train.input_shape)
    check_fits_data(student, train, "student", preset.student.arch)
    student.to(device)
    model: torch.nn.Module = student
    if ranks.active:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    main = ranks.is_main  # rank 0 writes the run folder; every rank trains
    key = store.manifest.key if store else None
    check_run_folder(folder, preset, key)  # again, now that the cache is known
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    config = {
        "preset": preset.to_dict(),
        "run_name": name,
        "cache": store.where if store else None,
        "cache_key": key,
        "device": str(device),
        "batches": source,
        "mode": f"ddp x{ranks.world}" if ranks.active else "sequential",
        "changed_settings": changes,
        "sparse_target": cfg.sparse_target if store else None,
        "approximated_temperatures": approximated,  # T the cache has no logsumexp for
        "approximation": APPROXIMATION if approximated else None,
    }
    metrics = folder / "metrics.jsonl"
    if main:
        (folder / "config.json").write_text(strict_json.dumps(config, indent=2) + "\n")
        (folder / "summary.json").unlink(missing_ok=True)
        metrics.write_text("")
    if verbose and main:
        console.print(
            f"distilling {preset.student.arch} with '{cfg.method}' from {source}"
            f"{'' if store is None else ' ' + store.where} on {device}",
            highlight=False,
        )
        if changes:
            console.print(f"settings changed from the preset: {describe(changes)}", highlight=False)
        if approximated:
            console.print(
                f"note: T = {', '.join(f'{t:g}' for t in approximated)} has no stored logsumexp; using the "
                f"{APPROXIMATION}",
                highlight=False,
            )

    def loss_at(epoch: int) -> Any:
        if cfg.method == "ce":
            return functools.partial(cross_entropy, label_smoothing=cfg.label_smoothing)
        return functools.partial(hinton_kd, target=cfg.sparse_target, **settings_at(epoch))

    def settings_at(epoch: int) -> dict[str, float]:
        if cfg.method == "ce":
            return {}
        return {"temperature": temperature_at(epoch, cfg), "alpha": alpha_at(epoch, cfg),
                "label_smoothing": cfg.label_smoothing}  # fmt: skip

    def log(record: EpochRecord, improved: bool) -> None:
        used = {k: v for k, v in settings_at(record.epoch - 1).items() if k != "label_smoothing"}
        with metrics.open("a") as f:
            f.write(strict_json.dumps({**record.line(), **used}) + "\n")

    val = (train.inputs[val_rows], train.labels[val_rows])
    result = fit(
        model, cfg.train, batches=lambda epoch: batches.epoch(generator), loss_at=loss_at, val=val,
        test=(test.inputs, test.labels), device=device, task=SEQUENCES, on_epoch=log if main else None,
        desc=cfg.method, progress=main and verbose,
    )  # fmt: skip
    barrier(ranks)
    if not main:
        return {}
    arch = architecture_record(preset.student, train.num_classes, train.input_shape)
    save_checkpoint(folder / "checkpoint", student, arch, {"best_epoch": result.best_epoch})
    tokens_stored = (
        store.nbytes_stored() / max(store.manifest.logit_stats.get("tokens", 1), 1) if store else None
    )
    summary = {
        "run_name": name,
        "preset": preset.name,
        "method": cfg.method,
        "method_label": (
            "ce" if cfg.method == "ce" else f"kd, {'dense (online)' if store is None else cfg.sparse_target}"
        ),
        "sparse_target": config["sparse_target"],
        "teacher_online": bool(cfg.teacher_online and cfg.method == "kd"),
        "temperature": cfg.temperature if cfg.method == "kd" else None,
        "alpha": cfg.alpha if cfg.method == "kd" else None,
        "label_smoothing": cfg.label_smoothing,
        "changed_settings": changes,
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "best_epoch": result.best_epoch,
        "student_val_perplexity": result.best_val_perplexity,
        "student_test_perplexity": result.test_perplexity,
        "student_test_token_accuracy": result.test_token_accuracy,
        "teacher_test_perplexity": teacher_test,
        "teacher": preset.teacher.name if cfg.method == "kd" else None,
        "cache": store.where if store else None,
        "cache_bytes_per_token": tokens_stored,
        "approximated_temperatures": approximated,
        "device": str(device),
        "wall_time_s": round(result.seconds, 2),
        "step_seconds": result.step_seconds,  # median training step
        "run_dir": str(folder),
    }
    _plot(result.history, folder / "curves.png", name, result.best_epoch, teacher_test)
    (folder / "summary.json").write_text(strict_json.dumps(summary, indent=2) + "\n")
    if verbose:
        teacher_text = "" if teacher_test is None else f", teacher {teacher_test:.2f}"
        console.print(
            f"test perplexity {result.test_perplexity:.2f} (token accuracy {result.test_token_accuracy:.2%}, "
            f"best epoch {result.best_epoch}{teacher_text}); outputs: {folder}",
            highlight=False,
        )
    return summary


def _teacher_side(
    preset: Preset, paths: Paths, cache: str | Path | None, train: Any, test: Any, device: torch.device
) -> tuple[LogitStore | None, SparseTargets | None, torch.nn.Module | None, float | None, str]:
    """(the sparse cache, its targets in memory, the online teacher, the teacher's test perplexity, where
    the targets come from): a cache for kd, the teacher itself for --online, nothing for ce. A cache is
    checked before training: temperatures it cannot give exactly (with distill.sparse_exact), and
    samples for the sampled target."""
    from pipeline.discovery import find_train_cache
    from pipeline.far_cache import fits_in_memory
    from pipeline.models import online_teacher

    cfg = preset.distill
    temperatures = [temperature_at(e, cfg) for e in range(cfg.train.epochs)]
    store: LogitStore | None = None
    targets: SparseTargets | None = None
    teacher = None
    teacher_test = None
    if cfg.method == "kd" and cfg.teacher_online:
        teacher, _ = online_teacher(preset, paths, train, device)
        with teacher_autocast(device, preset.cache.precision):
            teacher_test = score_sequences(teacher, test.inputs, test.labels, device)["perplexity"]
        source = "teacher online (dense KD)"
    elif cfg.method == "kd":
        store = find_train_cache(preset, paths, train, cache, required=True)
        assert store is not None
        stored = store.manifest.sparse["lse_temperatures"]
        missing = unstored_temperatures(store, temperatures)
        if missing and cfg.sparse_exact:
            listed = ", ".join(f"{t:g}" for t in stored)
            wanted = ",".join(f"{t:g}" for t in sorted({*stored, *missing}))
            raise KDError(
                f"cache {store.where} has the full logsumexp at T = {listed} only, not at T = "
                f"{', '.join(f'{t:g}' for t in missing)} (distill.sparse_exact = true): rebuild it with "
                f"--set cache.lse_temperatures={wanted}"
                ", or set distill.sparse_exact=false for the uniform-tail approximation"
            )
        if cfg.sparse_target == "sampled" and not store.manifest.sparse["samples"]:
            raise KDError(
                f"distill.sparse_target = sampled but cache {store.where} holds no sampled tokens: rebuild "
                "it with --set cache.samples=S (e.g. 32)"
            )
        if fits_in_memory(store, cfg):
            values, _, ids, extras = store.read_everything()
            if not torch.equal(ids, train.ids):
                raise KDError(f"cache {store.where} lists its sequences in another order than the data")
            targets = SparseTargets.from_arrays(
                values, extras, store.manifest.sparse, store.manifest.storage.dtype
            )
            source = f"cache in memory ({cfg.sparse_target})"
        else:  # bigger than distill.memory_budget_mb: shard by shard as training asks (StreamedSequences)
            source = f"cache streamed, shard-shuffled ({cfg.sparse_target})"
        teacher_test = _teacher_test_perplexity(store, test)
    else:
        source = "labels"
    return store, targets, teacher, teacher_test, source


def unstored_temperatures(store: LogitStore, temperatures: list[float]) -> list[float]:
    """The temperatures of `temperatures` a sparse cache holds no full logsumexp at (approximated)."""
    return sorted(
        {t for t in temperatures if stored_at(store.manifest.sparse["lse_temperatures"], t) is None}
    )


def _teacher_test_perplexity(store: LogitStore, test: Any) -> float | None:
    """The teacher's test perplexity from its test-split cache, when one with the same teacher exists."""
    from pipeline.store import find_caches

    for candidate in find_caches(
        Path(store.where).parent,
        dataset_fingerprint=test.fingerprint,
        split="test",
        teacher=store.manifest.teacher.name,
    ):
        if candidate.manifest.teacher.fingerprint == store.manifest.teacher.fingerprint:
            return candidate.manifest.logit_stats.get("perplexity")
    return None


def _plot(history: list[EpochRecord], path: Path, title: str, best_epoch: int, teacher: float | None) -> None:
    from pipeline.plots import pyplot

    plt = pyplot()
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r.train_loss for r in history])
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_ppl.plot(epochs, [r.val_perplexity for r in history], label="val", color="tab:blue")
    if teacher is not None:
        ax_ppl.axhline(teacher, ls="--", color="tab:green", label="teacher test")
    ax_ppl.axvline(best_epoch, ls=":", color="k", label=f"selected (epoch {best_epoch})")
    ax_ppl.set(xlabel="epoch", ylabel="perplexity", title="validation perplexity", yscale="log")
    ax_ppl.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
