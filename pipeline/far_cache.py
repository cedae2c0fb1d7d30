"""Reading a far cache (an fsspec URL, or a remote cache root): through local copies that heal.

A far cache that fits in memory is read through a whole local copy under DATA_DIR/remote-cache (or the
remote root's staging folder), fetched again only when the far manifest's content key changes; a
larger one streams lazily, shard by shard as training asks for them, through a bounded local shard
cache (`distill.remote_cache_mb`, pipeline.store.shard_cache), never copied whole.

Every local copy is a cache of far data: one that fails a check on read (zip CRC, a truncated or
missing member, the cache's CRC32C) is deleted and fetched again, once, with one warning line. Only
a far copy that fails is an error, and its message names the far URL.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from pipeline.backends import read_through_path
from pipeline.config import DistillConfig, Paths
from pipeline.errors import KDError
from pipeline.remote import copy_cache
from pipeline.store import LogitStore
from pipeline.store.shard_cache import ShardCache


def fits_in_memory(store: LogitStore, cfg: DistillConfig) -> bool:
    """Whether the cache, as training holds it (LogitStore.memory_bytes), fits `distill.memory_budget_mb`:
    then it is read whole, else streamed."""
    return store.memory_bytes() <= cfg.memory_budget_mb * 2**20


def open_far_cache(url: str, paths: Paths, *, memory_budget_mb: int, remote_cache_mb: int) -> LogitStore:
    """A far cache, checked complete: read through a local copy when it fits `memory_budget_mb` (its
    shards already read and checked), else streamed lazily through a local shard cache of at most
    `remote_cache_mb`."""
    remote = LogitStore.open(url)
    if remote.memory_bytes() <= memory_budget_mb * 2**20:  # the manifest says how big: nothing else read
        remote.require_complete()
        local = (
            paths.logits / read_through_path(url, Path()).name
            if paths.remote
            else read_through_path(url, paths.data / "remote-cache")
        )
        return read_through(remote, local)
    folder = paths.data / "remote-cache" / "shards" / remote.manifest.key[:16]
    remote.shard_cache = ShardCache(folder, remote_cache_mb * 2**20)
    remote.require_complete()  # its done flags, with the ids, kept in the shard cache for the next run
    _say(
        f"streaming {url} lazily: shards fetched as needed, up to {remote_cache_mb} MB of them "
        f"kept in {folder}"
    )
    return remote


def read_through(remote: LogitStore, local: Path) -> LogitStore:
    """A far cache (opened and checked complete) through its local copy at `local`: the copy kept from
    an earlier run when it holds the same cache (content key) and passes every check as it is read,
    else fetched again. The copy returned has been read whole (LogitStore.preload)."""
    url = remote.where
    kept = _kept_copy(local, remote)
    if kept is not None:
        problem = _read_problem(kept)
        if problem is None:
            return kept
        _say(f"warning: the local copy {local} of {url} is damaged ({problem}): fetching it again")
    _say(f"fetching {url} -> {local}")
    copy_cache(url, local, overwrite=True)
    fetched = LogitStore.open(local)
    problem = _read_problem(fetched)
    if problem is not None:
        problems = fetched.verify()
        raise KDError(
            f"the far cache {url} is damaged ({problems[0] if problems else problem}): push a sound copy "
            f"to it (`kd cache push CACHE {url} --force`); `kd cache verify {url}` lists every problem"
        )
    return fetched


def _kept_copy(local: Path, remote: LogitStore) -> LogitStore | None:
    """The local copy when it opens and holds the far cache's content key, complete; else None."""
    if not local.exists():
        return None
    try:
        kept = LogitStore.open(local)
    except KDError as err:
        _say(f"warning: the local copy {local} of {remote.where} cannot be opened ({err}): fetching it again")
        return None
    if kept.manifest.key != remote.manifest.key or not kept.manifest.complete:
        return None
    return kept


def _read_problem(store: LogitStore) -> str | None:
    """What fails when the cache is read whole and checked (None: sound, and held for the next read)."""
    try:
        store.require_complete()
        store.preload()
    except (KDError, OSError, zipfile.BadZipFile) as err:
        return str(err)
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
