"""Stage 1: run the teacher once over each split and store its raw logits in a Zarr v3 cache.

    kd teacher-logits --preset mnist1d           # = make teacher-logits

One store per split under data/logits/ (or --cache-dir / KD_CACHE_DIR), named
<teacher>.<dataset>.<split>.<key>.zarr where the key hashes teacher weights, data, preprocessing and
storage options. A complete store with the same key is reused ("cache hit"); an incomplete one is
rewritten. Shards are written by a background thread while the teacher computes the next batches.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console

from pipeline.backends import exists as remote_exists
from pipeline.config import Paths, Preset
from pipeline.data.augment import check_augment
from pipeline.data.datasets import Split, load_split
from pipeline.discovery import existing_caches
from pipeline.errors import KDError
from pipeline.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_same_teacher,
    check_teacher_tokenizer,
    checkpoint_architecture,
    fingerprint,
    load_checkpoint,
    teacher_precision,
)
from pipeline.remote import copy_cache
from pipeline.store import (
    DatasetInfo,
    LogitStore,
    Manifest,
    StorageInfo,
    TeacherInfo,
    cache_dirname,
    cache_lock,
    now_iso,
    software_versions,
)
from pipeline.teacher_pass import shards_of, write_logits
from pipeline.training.distributed import Ranks, barrier, broadcast, device_for, init
from pipeline.training.loop import pick_device

console = Console(stderr=True, soft_wrap=True)


def run(
    preset: Preset,
    paths: Paths,
    *,
    splits: tuple[str, ...] = ("train", "test"),
    force: bool = False,
    teacher_dir: Path | None = None,
    device_name: str = "auto",
) -> list[Path]:
    folder = teacher_dir if teacher_dir is not None else paths.teachers / preset.teacher.name
    have_teacher = (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()
    data = {name: load_split(preset.dataset, name) for name in splits}
    if not have_teacher:
        # The teacher may be gone (deleted, or never here: a colleague's cache): complete caches suffice.
        found = existing_caches(preset, paths, data) if not force else None
        if found is not None:
            if teacher_dir is None:
                first = next(iter(found.values()))
                built = LogitStore.open(first).manifest.teacher.architecture
                check_same_teacher(built, preset, f"the cached logits' teacher ({first})")
            for name, where in found.items():
                console.print(f"cache hit ({name}, teacher checkpoint absent): {where}", highlight=False)
            return [Path(where) for where in found.values()]
        hint = (
            "pass a folder holding model.safetensors and config.json"
            if teacher_dir is not None
            else f"run `kd train-teacher --preset {preset.command_name}` "
            f"(or `make teacher PRESET={preset.command_name}`) first"
        )
        raise KDError(f"no teacher checkpoint at {folder}: {hint}")

    if teacher_dir is None:  # the preset's own teacher: it must be the architecture the preset describes
        check_same_teacher(checkpoint_architecture(folder), preset, str(folder))
    picked = pick_device(device_name)
    ranks = init(picked)
    device = device_for(ranks, picked)
    teacher, record = load_checkpoint(folder, trusted_arch=preset.teacher.model.arch)
    check_teacher_tokenizer(folder, next(iter(data.values())))  # every split shares one tokenizer
    teacher.to(device).eval()
    teacher_info = TeacherInfo(
        name=preset.teacher.name,
        architecture=record["architecture"],
        fingerprint=fingerprint(teacher, record["architecture"]),
        train_accuracy=record.get("train_accuracy"),
    )
    written = [
        _dump(teacher, teacher_info, data[name], preset, paths, device, force, ranks) for name in splits
    ]
    if paths.remote and ranks.is_main:
        written = [_publish(path, paths, force) for path in written]
    barrier(ranks)
    return written


def _publish(path: Path, paths: Paths, force: bool) -> Path:
    """With a remote cache root: the locally written (or found) cache is pushed there and verified."""
    url = f"{str(paths.remote).rstrip('/')}/{path.name}"
    if not force and remote_exists(url):
        remote = LogitStore.open(url)
        if remote.manifest.complete and remote.manifest.key == LogitStore.open(path).manifest.key:
            console.print(f"cache hit (remote): {url}")
            return path
    copy_cache(path, url, overwrite=True)
    problems = LogitStore.open(url).verify()
    if problems:
        raise KDError(f"the copy at {url} fails verification: {problems[0]}")
    console.print(f"pushed {path} -> {url} (verified)")
    return path


def _dump(
    teacher: torch.nn.Module,
    teacher_info: TeacherInfo,
    split: Split,
    preset: Preset,
    paths: Paths,
    device: torch.device,
    force: bool,
    ranks: Ranks,
) -> Path:
    if teacher_info.architecture["num_classes"] != split.num_classes:
        raise KDError(
            f"teacher '{teacher_info.name}' has {teacher_info.architecture['num_classes']} classes but "
            f"{split.dataset} has {split.num_classes}: pick a matching teacher or dataset"
        )
    sparse = preset.cache.sparse_for(split)  # token sequences: the sparse layout (store/sparse.py)
    row_width = max(sparse["seq_len"], 1) * sparse["k"] if sparse else split.num_classes
    chunk_rows = preset.cache.chunk_rows_for(row_width)
    storage = StorageInfo(
        dtype=preset.cache.dtype,
        chunk_rows=chunk_rows,
        shard_rows=chunk_rows * preset.cache.shard_chunks,
        codec=preset.cache.codec,
        level=preset.cache.zstd_level,
    )
    precision = teacher_precision(device, preset.cache.precision)
    if preset.cache.augment != "none" and split.split == "train":
        check_augment(preset.cache.augment, split.view_source)
    manifest = Manifest(
        teacher=teacher_info,
        dataset=DatasetInfo(
            name=split.dataset,
            split=split.split,
            length=len(split),
            num_classes=split.num_classes,
            fingerprint=split.fingerprint,
        ),
        storage=storage,
        preprocessing={**split.preprocessing, "teacher_precision": precision},  # part of the key
        software=software_versions(),
        created=now_iso(),
        views=preset.cache.views_for(split.split),
        sparse=sparse,
    )
    path = paths.logits / cache_dirname(manifest)
    # a cache hit is decided by reading alone (no lock, so read-only cache folders work)
    hit = ranks.is_main and not force and _is_hit(path)
    if broadcast(ranks, hit):
        if ranks.is_main:
            console.print(f"cache hit ({split.split}): {path}", highlight=False)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # rank 0 holds the lock and decides (hit, resume, fresh); every rank then writes its own shards
    with cache_lock(path) if ranks.is_main else contextlib.nullcontext():
        plan: str | list[int] | None = None
        if ranks.is_main:
            existing = _existing(path)
            redo = existing.shards_to_write() if existing is not None else []
            if existing is not None and not force and existing.manifest.complete and not redo:
                plan = "hit"  # finished by another writer while this one waited for the lock
            elif existing is not None and not force and len(redo) < existing.num_shards:
                # resume: the key in its name guarantees the same teacher, data and storage
                existing.reopen_for_writing()
                plan = redo
                done = existing.num_shards - len(plan)
                console.print(f"resuming {path}: {done}/{existing.num_shards} shards done", highlight=False)
            else:
                plan = list(range(LogitStore.create(path, manifest, overwrite=True).num_shards))
        plan = broadcast(ranks, plan)
        if plan == "hit":
            if ranks.is_main:
                console.print(f"cache hit ({split.split}): {path}")
            return path
        assert isinstance(plan, list)
        started = time.perf_counter()
        if ranks.is_main and split.reading:
            console.print(split.reading, highlight=False)
        store = LogitStore.open(path, writable=True)
        mine = shards_of(plan, ranks.rank, ranks.world)
        write_logits(
            teacher,
            split,
            store,
            device,
            preset.cache.batch_size,
            shards=mine,
            progress=ranks.is_main,
            precision=precision,
        )
        barrier(ranks)
        if ranks.is_main:
            store = LogitStore.open(path, writable=True)  # every rank's shards, as on disk
            store.finish()
        barrier(ranks)
    if not ranks.is_main:
        return path
    n, seconds = len(split), time.perf_counter() - started
    processes = f", {ranks.world} processes" if ranks.active else ""
    if split.task == "sequence":
        tokens = store.manifest.logit_stats["tokens"]
        samples = f" + {sparse['samples']} samples" if sparse["samples"] else ""
        console.print(
            f"wrote {path} ({n} x {sparse['seq_len']} tokens, top {sparse['k']} of {sparse['vocab']} "
            f"{storage.dtype}{samples}, "
            f"teacher token accuracy {store.manifest.teacher_accuracy:.2%}, perplexity "
            f"{store.manifest.logit_stats['perplexity']:.2f}, {store.nbytes_stored() / tokens:.1f} bytes a "
            f"token, {tokens / seconds:,.0f} tokens/s{processes})",
            highlight=False,
        )
        return path
    console.print(
        f"wrote {path} ({n} x {_views_text(manifest)}{_topk_text(sparse)}{split.num_classes} "
        f"{storage.dtype}, teacher accuracy "
        f"{store.manifest.teacher_accuracy:.2%}, {store.nbytes_stored() / 1024:.0f} KiB, "
        f"{n / seconds:,.0f} samples/s{processes})"
    )
    return path


def _topk_text(sparse: dict) -> str:
    return f"top {sparse['k']} of " if sparse else ""


def _views_text(manifest: Manifest) -> str:
    v = manifest.views
    return f"{v['count']} {v['augment']['kind']} views x " if v else ""


def _is_hit(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        store = LogitStore.open(path)
    except KDError:
        return False
    return store.is_intact


def _existing(path: Path) -> LogitStore | None:
    """The store at `path` opened for writing, or None when there is none (or it is unreadable)."""
    if not path.exists():
        return None
    try:
        return LogitStore.open(path, writable=True)
    except KDError:
        return None
