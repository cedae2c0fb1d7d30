"""The data side of a student's run, for classifiers and language models alike: the splits and the
validation carve, the cache found and checked against them (or the teacher run online, or the labels
alone), the batches the loop trains on, and what the run folder records about them.

    data = prepare(preset, paths, cache=None, device=device)   # what `kd distill` and the sweeps train on
    for batch in data.batches.epoch(generator): ...             # pipeline.distill.batches.Batch

Classifiers: a cache held in memory or streamed shard by shard (`distill.memory_budget_mb`), its stored
views replayed, a top-k cache rebuilt to every class. Language models: a sparse cache's targets
(`distill.sparse_target`), the temperatures it holds no logsumexp for approximated (or refused with
`distill.sparse_exact`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.config import DistillConfig, Paths, Preset
from pipeline.data.augment import AugmentSpec, check_augment
from pipeline.data.datasets import Split, load_split, validation_rows
from pipeline.data.readers import rows_of
from pipeline.discovery import find_train_cache
from pipeline.distill.batches import (
    InMemoryBatches,
    OnlineBatches,
    StreamedBatches,
    Views,
    cached_logits_for,
    cached_views_for,
)
from pipeline.distill.lm import SequenceBatches, StreamedSequences
from pipeline.distill.methods import LABEL_ONLY, TABLE
from pipeline.distill.schedules import temperature_at
from pipeline.distill.targets import SparseTargets
from pipeline.errors import KDError
from pipeline.far_cache import fits_in_memory
from pipeline.models import online_teacher, teacher_autocast
from pipeline.store import LogitStore, find_caches
from pipeline.store.sparse import stored_at
from pipeline.training.loop import CLASSES, SEQUENCES, Task, accuracy, predict, score_sequences

SEQUENCE_METHODS = tuple(name for name, m in TABLE.items() if m.sequences)
UNIFORM_TAIL = (
    "uniform tail: at a temperature with no stored logsumexp, the V - k missing logits are taken equal, "
    "keeping their total mass at the first stored temperature exact"
)


class Splits(NamedTuple):
    """The splits a run reads and the validation carve of train (row positions)."""

    train: Split
    test: Split
    train_rows: torch.Tensor
    val_rows: torch.Tensor


@dataclass
class Prepared:
    """The data side of a run, shared by every student trained on the same stream of batches."""

    train: Split
    test: Split
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    store: LogitStore | None
    teacher_test: float | None  # the teacher's test metric of the task (accuracy, perplexity)
    batches: InMemoryBatches | StreamedBatches | OnlineBatches | SequenceBatches
    source: str  # where the teacher side comes from, for config.json and the console
    device: torch.device
    views: str = "none"  # what the student's inputs are, against what targets (config.json "views")
    teacher_name: str | None = None
    approximation: str | None = None  # how missing teacher logits are filled in (config.json)
    task: Task = CLASSES
    config: dict[str, Any] = field(default_factory=dict)  # what config.json adds for this task
    summary: dict[str, Any] = field(default_factory=dict)  # and summary.json

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rows_of(self.train.inputs, self.val_rows), self.train.labels[self.val_rows]

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test.inputs, self.test.labels

    @property
    def teacher_test_accuracy(self) -> float | None:
        return self.teacher_test if self.task is CLASSES else None


def prepare(preset: Preset, paths: Paths, *, cache: str | Path | None, device: torch.device) -> Prepared:
    """Data, validation carve, the checked cache and the batch source for `preset.distill`."""
    train, test = load_split(preset.dataset, "train"), load_split(preset.dataset, "test")
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)
    splits = Splits(train, test, train_rows, val_rows)
    if train.task == "sequence":
        return _sequences(preset, paths, cache, device, splits)
    return _classes(preset, paths, cache, device, splits)


def _classes(
    preset: Preset, paths: Paths, cache: str | Path | None, device: torch.device, splits: Splits
) -> Prepared:
    train, test, train_rows, val_rows = splits
    cfg = preset.distill
    check_augment(cfg.train.augment, train.view_source)
    fresh = Views(AugmentSpec(cfg.train.augment, cfg.train.augment_pad), choice=cfg.views, seed=cfg.seed)
    views = "none" if fresh.spec.kind == "none" else f"fresh {fresh.spec.kind}{fresh.spec.pad_text}"
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
        source = "teacher online"
        return Prepared(
            train, test, train_rows, val_rows, None, teacher_test, batches, source, device, views, name
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
            print(
                f"warning: the cache holds the teacher's logits of the fixed view but the student trains on "
                f"fresh {fresh.spec.kind} views, so targets and inputs differ; a view cache matches them "
                '(cache.augment, cache.views; README "Augmented views")',
                file=sys.stderr,
                flush=True,
            )
            views += " vs the fixed view's targets"
        return fresh, views
    spec = store.augment  # refused here when this version cannot replay the cache's views
    if cfg.train.augment not in ("none", spec.kind) or (
        cfg.train.augment == spec.kind and cfg.train.augment_pad != spec.pad and not spec.on_files
    ):
        raise KDError(
            f"the cache holds {spec.kind} views{spec.pad_text} but distill.train.augment is "
            f"{cfg.train.augment}{AugmentSpec(cfg.train.augment, cfg.train.augment_pad).pad_text}: the "
            "student replays the cached views, so "
            f'set distill.train.augment to "{spec.kind}" or "none", or use a cache of the views you want'
        )
    check_augment(spec.kind, train.view_source)
    count = store.num_views
    all_views = " (all)" if store.manifest.views.get("all") else ""
    return (
        Views(spec, None, cfg.views, cfg.seed),
        f"cached: {count}{all_views} {spec.kind} views{spec.pad_text}, one per row per epoch ({cfg.views})",
    )


def _teacher_test_accuracy(
    store: LogitStore | None, test: Split, remote: str | None = None, local: Path | None = None
) -> float | None:
    """The same teacher's accuracy on the test split, from the test cache's manifest (no data read):
    found beside the train cache, else among the local caches (a train cache pushed or pulled alone)."""
    found = _test_cache(store, test, remote, local)
    return None if found is None else found.manifest.teacher_accuracy


def _test_cache(
    store: LogitStore | None, test: Split, remote: str | None = None, local: Path | None = None
) -> LogitStore | None:
    """The same teacher's cache of the test split, beside the train cache or among the local ones."""
    if store is None:
        return None
    roots = [remote or Path(store.where).parent, *([local] if local is not None else [])]
    for root in dict.fromkeys(str(r) for r in roots):
        for candidate in find_caches(
            root, dataset_fingerprint=test.fingerprint, split="test", teacher=store.manifest.teacher.name
        ):
            if candidate.manifest.teacher.fingerprint == store.manifest.teacher.fingerprint:
                return candidate
    return None


def _sequences(
    preset: Preset, paths: Paths, cache: str | Path | None, device: torch.device, splits: Splits
) -> Prepared:
    """A language model's data side: a sparse cache for kd (checked before training: the temperatures it
    cannot give exactly with distill.sparse_exact, samples for the sampled target), the teacher itself
    for --online, the labels alone for ce."""
    train, test, train_rows, val_rows = splits
    cfg = preset.distill
    if cfg.method not in SEQUENCE_METHODS:
        raise KDError(
            f"method '{cfg.method}' is for classification: a language model trains with "
            f"{' or '.join(SEQUENCE_METHODS)} (kd from a sparse cache or --online)"
        )
    store: LogitStore | None = None
    targets: SparseTargets | None = None
    stream: StreamedSequences | None = None
    teacher, teacher_test, approximated = None, None, []
    if cfg.method == "kd" and cfg.teacher_online:
        teacher, _ = online_teacher(preset, paths, train, device)
        with teacher_autocast(device, preset.cache.precision):
            teacher_test = score_sequences(teacher, test.inputs, test.labels, device)["perplexity"]
        source = "teacher online (dense KD)"
    elif cfg.method == "kd":
        store = find_train_cache(preset, paths, train, cache, required=True)
        assert store is not None
        approximated = _check_sequence_cache(store, cfg)
        if fits_in_memory(store, cfg):
            values, _, ids, extras = store.read_everything()
            if not torch.equal(ids, train.ids):
                raise KDError(f"cache {store.where} lists its sequences in another order than the data")
            targets = SparseTargets.from_arrays(
                values, extras, store.manifest.sparse, store.manifest.storage.dtype
            )
            source = f"cache in memory ({cfg.sparse_target})"
        else:  # bigger than distill.memory_budget_mb: shard by shard as training asks
            stream = StreamedSequences(store, train.ids, train_rows, cfg.train.batch_size)
            source = f"cache streamed, shard-shuffled ({cfg.sparse_target})"
        found = _test_cache(store, test)
        teacher_test = None if found is None else found.manifest.logit_stats.get("perplexity")
    else:
        source = "labels"
    batches = SequenceBatches(
        train, train_rows, cfg.train.batch_size, device, targets=targets, stream=stream, teacher=teacher,
        precision=preset.cache.precision,
    )  # fmt: skip
    kd = cfg.method == "kd"
    tokens = store.manifest.logit_stats.get("tokens", 1) if store else 1
    return Prepared(
        train,
        test,
        train_rows,
        val_rows,
        store,
        teacher_test,
        batches,
        source,
        device,
        teacher_name=preset.teacher.name if kd else None,
        approximation=(
            f"T = {', '.join(f'{t:g}' for t in approximated)} has no stored logsumexp; using the "
            f"{UNIFORM_TAIL}"
            if approximated
            else None
        ),
        task=SEQUENCES,
        config={
            "sparse_target": cfg.sparse_target if store else None,
            "approximated_temperatures": approximated,  # T the cache has no logsumexp for
        },
        summary={
            "method_label": "ce"
            if not kd
            else f"kd, {'dense (online)' if store is None else cfg.sparse_target}",
            "sparse_target": cfg.sparse_target if store else None,
            "teacher_online": bool(cfg.teacher_online and kd),
            "temperature": cfg.temperature if kd else None,
            "alpha": cfg.alpha if kd else None,
            "cache_bytes_per_token": store.nbytes_stored() / max(tokens, 1) if store else None,
            "approximated_temperatures": approximated,
        },
    )


def _check_sequence_cache(store: LogitStore, cfg: DistillConfig) -> list[float]:
    """The temperatures of the run the sparse cache holds no logsumexp at (approximated); refused with
    distill.sparse_exact, as is the sampled target from a cache without samples."""
    temperatures = [temperature_at(e, cfg) for e in range(cfg.train.epochs)]
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
    return missing


def unstored_temperatures(store: LogitStore, temperatures: list[float]) -> list[float]:
    """The temperatures of `temperatures` a sparse cache holds no full logsumexp at (approximated)."""
    return sorted(
        {t for t in temperatures if stored_at(store.manifest.sparse["lse_temperatures"], t) is None}
    )
