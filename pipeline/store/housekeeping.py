"""Finding caches under a root, and what `kd cache rm` / `gc` may delete: only caches and their remains.

A delete never touches a user's other files: an entry is removed only when it is a kd cache or what is
left of one (a folder whose name ends in .zarr holding nothing but cache members), an interrupted copy
of ours, or the lock file of a writer that is gone; and never while a live writer holds its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.backends import TMP_MARK, is_url, list_root
from pipeline.errors import KDError
from pipeline.store.dense import MEMBERS, LogitStore
from pipeline.store.lock import LOCK_SUFFIX, holder
from pipeline.store.manifest import is_manifest


def cache_like(path: Path) -> bool:
    """A kd cache folder or its remains: named *.zarr (or an interrupted copy of ours), holding only
    cache members, and not some other Zarr group."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not (path.name.endswith(".zarr") or TMP_MARK in path.name):
        return False
    if not {p.name for p in path.iterdir()} <= set(MEMBERS):
        return False
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return True  # no (readable) metadata: the remains of a cache
    if not attrs:
        return True  # created, manifest not yet written: a cache that died young
    return isinstance(attrs, dict) and is_manifest(attrs)


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def stale_entries(
    root: Path, older_than_hours: float
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(what `kd cache gc` removes, what it leaves alone and why) among the entries directly under `root`
    untouched for `older_than_hours`: incomplete caches and remains of caches with no live writer,
    interrupted copies, and lock files of writers that are gone. Complete caches are kept."""
    cutoff = time.time() - older_than_hours * 3600
    collect, skipped = [], []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_symlink():
            skipped.append((path, "a symbolic link (not followed)"))
            continue
        try:
            if _newest_mtime(path) > cutoff:
                continue
        except OSError as err:
            skipped.append((path, f"cannot be read ({err.strerror})"))
            continue
        if path.name.endswith(LOCK_SUFFIX) and path.is_file():
            if holder(path) is not None:
                continue
            if not _is_lock_record(path):
                skipped.append((path, "not a kd lock file"))
                continue
            collect.append((path, "lock of a writer that is gone"))
            continue
        if not path.is_dir():
            if path.is_file() and re.fullmatch(rf".+\.zip{re.escape(TMP_MARK)}\d+-[0-9a-f]{{6}}", path.name):
                collect.append((path, "an interrupted copy"))  # a zip being written under its temporary name
            continue
        if not cache_like(path):
            skipped.append((path, "not a logit cache"))
            continue
        if holder(path) is not None:
            continue  # being written
        if TMP_MARK in path.name:
            collect.append((path, "an interrupted copy"))
            continue
        try:
            store = LogitStore.open(path)
        except KDError:
            collect.append((path, "the remains of a cache (no readable manifest)"))
            continue
        if not store.is_complete:
            done = int(store.shards_done().sum())
            collect.append((path, f"incomplete ({done}/{store.num_shards} shards)"))
    return collect, skipped


def _is_lock_record(path: Path) -> bool:
    try:
        text = path.read_text()
        return text == "" or {"pid", "host"} <= set(json.loads(text))
    except (OSError, ValueError, TypeError):
        return False


def find_caches(
    root: Path | str,
    *,
    dataset_fingerprint: str | None = None,
    split: str | None = None,
    teacher: str | None = None,
    views: Mapping[str, Any] | None = None,
    sparse: Mapping[str, Any] | None = None,
    skipped: list[str] | None = None,
) -> list[LogitStore]:
    """Complete caches under `root` matching the given fields (`views`, `sparse`: the manifest's entries,
    {} for the dense layout), newest first. Entries that cannot be opened are left out, each named with its
    reason in `skipped` when a list is given."""
    found = []
    entries: list[Any]
    if is_url(root):
        entries = [e for e in list_root(root) if e.rstrip("/").endswith((".zarr", ".zip"))]
    else:
        entries = sorted(Path(root).glob("*.zarr")) if Path(root).is_dir() else []
    for path in entries:
        try:
            store = LogitStore.open(path)
        except KDError as err:
            if skipped is not None:
                skipped.append(str(err))
            continue
        m = store.manifest
        if not m.complete:
            continue
        if dataset_fingerprint and m.dataset.fingerprint != dataset_fingerprint:
            continue
        if split and m.dataset.split != split:
            continue
        if teacher and m.teacher.name != teacher:
            continue
        if views is not None and m.views != dict(views):
            continue
        if sparse is not None and m.sparse != dict(sparse):
            continue
        found.append(store)
    return sorted(found, key=lambda s: s.manifest.created, reverse=True)
