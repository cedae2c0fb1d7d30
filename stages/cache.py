"""Inspect logit caches.

kd cache info data/logits/<name>.zarr [--json]
kd cache ls [DIR]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.errors import KDError
from pipeline.remote import copy_cache, list_root
from pipeline.store import LogitStore, inside, stale_entries


def info(path: str | Path, *, as_json: bool = False) -> None:
    store = LogitStore.open(path)
    manifest = store.manifest.to_dict()
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    m = store.manifest
    console = Console()
    console.print(f"[bold]{path}[/bold]")
    rows = [
        ("format", f"{m.format['name']} v{m.format['version']}"),
        ("complete", f"{m.complete} ({int(store.shards_done().sum())}/{store.num_shards} shards done)"),
        (
            "teacher",
            f"{m.teacher.name} ({m.teacher.architecture.get('arch')}), sha256 {m.teacher.fingerprint[:16]}",
        ),
        (
            "teacher accuracy",
            f"{_pct(m.teacher_accuracy)} on this {m.dataset.split} split; "
            f"{_pct(m.teacher.train_accuracy)} on the rows it was trained on",
        ),
        ("logit stats", ", ".join(f"{k} {v:.3f}" for k, v in m.logit_stats.items()) or "-"),
        (
            "dataset",
            f"{m.dataset.name}/{m.dataset.split}: {m.dataset.length} rows x {m.dataset.num_classes} classes, "
            f"sha256 {m.dataset.fingerprint[:16]}",
        ),
        ("preprocessing", json.dumps(m.preprocessing)),
        (
            "storage",
            f"{m.storage.dtype}, chunks {m.storage.chunk_rows} rows, shards {m.storage.shard_rows} rows, "
            f"{m.storage.codec} level {m.storage.level}, {_size(store.nbytes_stored())} on disk",
        ),
        ("software", ", ".join(f"{k} {v}" for k, v in m.software.items())),
        ("created", m.created),
        ("key", m.key),
    ]
    for name, value in rows:
        console.print(f"  {name:17} {value}", highlight=False, soft_wrap=True)


def verify(path: str | Path) -> bool:
    """Re-read everything; print each problem; True when there is none."""
    store = LogitStore.open(path)
    console = Console(stderr=True, soft_wrap=True)
    problems = store.verify()
    if problems:
        for problem in problems:
            console.print(f"[red]problem:[/red] {path}: {problem}", highlight=False)
        console.print(f"{len(problems)} problem(s): re-run `kd teacher-logits --force` to rebuild this cache")
        return False
    m = store.manifest
    console.print(
        f"ok: {path} ({m.dataset.length} x {m.dataset.num_classes} {m.storage.dtype}, {store.num_shards} "
        f"shards, checksums, shapes, finite values and labels all check)",
        highlight=False,
    )
    return True


def transfer(src: str | Path, dst: str | Path, *, force: bool) -> bool:
    """Copy a complete cache (push to / pull from a URL, a zip or a folder), then verify the copy."""
    LogitStore.open(src).require_complete()
    copy_cache(src, dst, overwrite=force)
    Console(stderr=True, soft_wrap=True).print(f"copied {src} -> {dst}; verifying the copy")
    return verify(dst)


def rm(root: Path, names: list[str], *, yes: bool) -> None:
    """Remove caches by name (directly under the root: names cannot escape it)."""
    targets = [inside(root, name) for name in names]
    for path in targets:
        if not path.is_dir():
            raise KDError(f"no cache named '{path.name}' in {root}: see `kd cache ls`")
        LogitStore.open(path)  # refuse to delete anything that is not a logit cache
    console = Console(stderr=True, soft_wrap=True)
    for path in targets:
        if not yes:
            console.print(f"would remove {path} (pass --yes to remove)")
            continue
        shutil.rmtree(path)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
        console.print(f"removed {path}")


def gc(root: Path, *, older_than_hours: float, yes: bool) -> None:
    """Remove incomplete or orphaned entries older than N hours (dry run unless --yes)."""
    console = Console(stderr=True, soft_wrap=True)
    entries = stale_entries(root, older_than_hours)
    if not entries:
        console.print(f"nothing to collect in {root} (older than {older_than_hours:g} h)")
    for path, why in entries:
        if yes:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        console.print(f"{'removed' if yes else 'would remove'} {path}: {why}")
    if entries and not yes:
        console.print("dry run: pass --yes to remove")


def ls(root: str | Path) -> None:
    entries = list_root(root)
    table = Table(title=f"logit caches in {root}")
    for column in ("name", "teacher", "dataset", "split", "rows", "classes", "dtype", "size", "complete"):
        table.add_column(column)
    count = 0
    for entry in entries:
        try:
            store = LogitStore.open(entry)
        except KDError:
            continue
        m = store.manifest
        complete = m.complete and bool(store.shards_done().all())
        table.add_row(
            entry.rstrip("/").rsplit("/", 1)[-1],
            m.teacher.name,
            m.dataset.name,
            m.dataset.split,
            str(m.dataset.length),
            str(m.dataset.num_classes),
            m.storage.dtype,
            _size(store.nbytes_stored()),
            "yes" if complete else "[red]no[/red]",
        )
        count += 1
    console = Console()
    if count:
        console.print(table)
    else:
        console.print(f"no logit caches in {root}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
