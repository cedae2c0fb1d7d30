"""Inspect, verify, copy and delete logit caches.

    kd cache info data/logits/<name>.zarr [--json]
    kd cache ls [DIR|URL]
    kd cache verify PATH|URL
    kd cache push data/logits/<name>.zarr s3://team/caches/      # -> s3://team/caches/<name>.zarr
    kd cache pull s3://team/caches/<name>.zarr data/logits/
    kd cache rm NAME [--yes]      kd cache gc [--older-than H] [--yes]

Deleting commands remove only caches (and their remains, interrupted copies, dead writers' locks), never
other files, and never a cache a live writer holds.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline import strict_json
from pipeline.backends import is_url, list_root, local_path
from pipeline.errors import KDError
from pipeline.remote import (
    Remains,
    another_cache,
    copy_cache,
    destination,
    remove_remains,
    upload_remains,
)
from pipeline.store import (
    LogitStore,
    cache_dirname,
    cache_like,
    cache_lock,
    holder,
    inside,
    stale_entries,
)
from pipeline.store.describe import (
    completeness,
    count,
    listing,
    listing_table,
    print_uploads,
    size_text,
    sparse_short,
    sparse_text,
    teacher_accuracy,
    views_text,
)


def _open(path: str | Path) -> LogitStore:
    """LogitStore.open, saying so when a URL holds the remains of an interrupted upload."""
    try:
        return LogitStore.open(path)
    except KDError:
        remains = upload_remains(path)
        if remains is None:
            raise
        source = (remains.record or {}).get("source") or "CACHE"
        raise KDError(
            f"{path} holds {remains.describe()}: finish it with `kd cache push {source} {path}`"
        ) from None


def info(path: str | Path, *, as_json: bool = False) -> None:
    store = _open(path)
    manifest = store.manifest.to_dict()
    if as_json:
        print(strict_json.dumps(manifest, indent=2))
        return
    m = store.manifest
    console = Console()
    console.print(f"[bold]{path}[/bold]")
    rows = [
        ("format", f"{m.format['name']} v{m.format['version']}"),
        ("complete", completeness(store)),
        (
            "teacher",
            f"{m.teacher.name} ({m.teacher.architecture.get('arch')}), sha256 {m.teacher.fingerprint[:16]}",
        ),
        ("teacher accuracy", teacher_accuracy(m)),
        (
            "logit stats",
            ", ".join(
                f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in m.logit_stats.items()
            )
            or "-",
        ),
        (
            "dataset",
            f"{m.dataset.name}/{m.dataset.split}: {m.dataset.length} rows x {m.dataset.num_classes} classes, "
            f"sha256 {m.dataset.fingerprint[:16]}",
        ),
        ("preprocessing", json.dumps(m.preprocessing)),
        ("views", views_text(m.views)),
        *([("sparse", sparse_text(m.sparse, store))] if m.sparse else []),
        (
            "storage",
            f"{m.storage.dtype}, chunks {m.storage.chunk_rows} rows, shards {m.storage.shard_rows} rows, "
            f"{m.storage.codec} level {m.storage.level}, {size_text(store.nbytes_stored())} on disk",
        ),
        ("software", ", ".join(f"{k} {v}" for k, v in m.software.items())),
        ("created", m.created),
        ("key", m.key),
    ]
    for name, value in rows:
        console.print(f"  {name:17} {value}", highlight=False, soft_wrap=True)


def verify(path: str | Path) -> bool:
    """Re-read everything; print each problem; True when there is none."""
    store = _open(path)
    console = Console(stderr=True, soft_wrap=True)
    problems = store.verify()
    if problems:
        for problem in problems:
            console.print(f"[red]problem:[/red] {path}: {problem}", highlight=False)
        if store.is_intact:
            console.print(
                f"{len(problems)} problem(s): rebuild this cache with `kd teacher-logits --force` "
                "(or pull a sound copy)",
                highlight=False,
            )
        return False
    m = store.manifest
    console.print(
        f"ok: {path} ({m.dataset.length} x {f'{m.num_views} views x ' if m.views else ''}"
        f"{sparse_short(m.sparse)}"
        f"{m.dataset.num_classes} {m.storage.dtype}, {count(store.num_shards, 'shard')}, checksums, "
        "shapes, finite "
        f"values{', view parameters' if m.views else ''} and labels all check)",
        highlight=False,
    )
    return True


def transfer(src: str | Path, dst: str | Path, *, force: bool) -> bool:
    """Copy a sound, complete cache (push to / pull from a URL, a zip or a folder), then verify the
    copy. DST ending in .zarr or .zip is the cache itself; anything else is a folder receiving
    DST/<name>.zarr. The source is verified first: a damaged cache is never copied."""
    store = _open(src)
    store.require_complete()
    problems = store.verify()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise KDError(
            f"{src} fails verification, not copied: {problems[0]}{more}; see `kd cache verify {src}`"
        )
    target = destination(src, dst, cache_dirname(store.manifest))
    other = another_cache(store.manifest, target)
    if other:  # --force replaces a copy of this cache, never another one that happens to have the name
        raise KDError(
            f"{target} holds {other}, not a copy of {src}: not replacing it (even with --force); "
            "choose another destination, or delete that copy yourself"
        )
    copy_cache(src, target, overwrite=force)
    Console(stderr=True, soft_wrap=True).print(
        f"copied {src} -> {target}; verifying the copy", highlight=False
    )
    return verify(target)


def rm(root: Path, names: list[str], *, yes: bool) -> None:
    """Remove caches by name (directly under the root: names cannot escape it). Only caches and their
    remains are removed, never while a live writer holds the cache's lock."""
    targets = []
    for name in names:
        path = inside(root, name)
        if not path.exists():
            raise KDError(f"no cache named '{path.name}' in {root}: see `kd cache ls`")
        if not cache_like(path):
            raise KDError(f"{path} is not a logit cache: not removing it")
        owner = holder(path)
        if owner is not None:
            raise KDError(
                f"cache {path} is being written by pid {owner.get('pid')} on {owner.get('host')}: "
                "wait for it to finish (or stop it) before removing it"
            )
        targets.append(path)
    console = Console(stderr=True, soft_wrap=True)
    for path in targets:
        if not yes:
            console.print(f"would remove {path} (pass --yes to remove)", highlight=False)
            continue
        with cache_lock(path):  # no writer may start while it goes
            shutil.rmtree(path)
        console.print(f"removed {path}", highlight=False)


def gc(root: str | Path, *, older_than_hours: float, yes: bool) -> None:
    """Remove incomplete caches, remains of caches, interrupted copies and uploads, and dead writers'
    lock files untouched for N hours (dry run unless --yes); anything else is left alone and named."""
    if is_url(root):
        _gc_url(str(root), older_than_hours=older_than_hours, yes=yes)
        return
    root = Path(local_path(root))
    console = Console(stderr=True, soft_wrap=True)
    entries, skipped = stale_entries(root, older_than_hours)
    for path, why in skipped:
        console.print(f"left alone: {path}: {why}", highlight=False)
    if not entries:
        console.print(f"nothing to collect in {root} (older than {older_than_hours:g} h)", highlight=False)
    for path, why in entries:
        if yes:
            if path.is_dir():
                with cache_lock(path):
                    shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        console.print(f"{'removed' if yes else 'would remove'} {path}: {why}", highlight=False)
    if entries and not yes:
        console.print("dry run: pass --yes to remove")


def _gc_url(root: str, *, older_than_hours: float, yes: bool) -> None:
    """gc under a URL prefix: the remains of interrupted uploads (a cache's objects, no manifest)
    untouched for N hours. Complete caches and anything that is not a cache's are left alone."""
    console = Console(stderr=True, soft_wrap=True)
    cutoff = time.time() - older_than_hours * 3600
    found = [r for entry in list_root(root) if (r := upload_remains(entry)) is not None]
    stale = [r for r in found if r.newest <= cutoff]
    if not stale:
        console.print(f"nothing to collect in {root} (older than {older_than_hours:g} h)", highlight=False)
    for remains in stale:
        if yes:
            remove_remains(remains)
        console.print(
            f"{'removed' if yes else 'would remove'} {remains.url}: {remains.describe()}", highlight=False
        )
    if stale and not yes:
        console.print("dry run: pass --yes to remove")


def ls(root: str | Path, *, long: bool = False, as_json: bool = False) -> None:
    """The caches under `root`: full names (what `kd cache rm` takes, never cut), rows, size, the teacher's
    accuracy on the cached split, when it was written and whether it is complete; --long adds teacher,
    dataset, split, classes and dtype; --json prints the same as a list of objects for scripts."""
    rows: list[dict[str, Any]] = []
    uploads: list[Remains] = []
    warn = Console(stderr=True, soft_wrap=True)
    entries = list_root(root)
    for entry in entries:
        if not entry.rstrip("/").endswith((".zarr", ".zip")):
            continue  # not named as a cache: someone else's folder
        remains = upload_remains(entry)
        if remains is not None:
            uploads.append(remains)
            continue
        try:
            rows.append(listing(entry))
        except (KDError, OSError, zipfile.BadZipFile) as err:  # one unreadable entry hides no other
            warn.print(f"warning: skipping an entry: {err}", highlight=False)
    if as_json:
        print(strict_json.dumps(rows, indent=2))
        print_uploads(uploads, str(root), warn)  # on stderr: the JSON holds caches only
        return
    console = Console(soft_wrap=True)  # lines are never broken mid-field: the terminal wraps them
    if not rows:
        empty = " (nothing under this prefix)" if is_url(root) and not entries else ""
        console.print(f"no logit caches in {root}{empty}", highlight=False)
        print_uploads(uploads, str(root), console)
        return
    listing_table(rows, root, long, console)
    print_uploads(uploads, str(root), console)
