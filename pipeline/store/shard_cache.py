"""A bounded local cache of a far cache's shards: what a lazily streamed remote cache keeps on disk.

Each shard fetched from remote storage (its stored logits, labels and view parameters, as read) is kept
as one .npz file under a folder of its own per cache key; when the files pass the byte budget, the
least recently used are deleted. A shard read back from here is checked against its CRC32C like any
other read, so a damaged local file is never trained on: it is a cache of far data, so a file that
fails any check (its zip CRC, a truncated or missing member, the shard's CRC32C) is deleted, with one
warning line, and the shard fetched again.

Beside the shards it keeps the cache's per-row sample ids and per-shard `done` flags (records.npz, 8
bytes a row, outside the budget), tagged with the digest of the manifest they were read under: opening
the same far cache again (the next run of a sweep) reads them here instead of one small object per
shard each. Any change to the far cache's manifest (its shard checksums included) fetches them again.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

NAMES = ("logits", "labels", "views")
RECORDS_FILE = "records.npz"


class ShardCache:
    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder, self.budget = folder, budget_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the prefetch thread and the reader share it
        self._sizes: OrderedDict[int, int] = OrderedDict()  # shard -> bytes, least recently used first
        files = sorted(folder.glob("shard-*.npz"), key=lambda p: p.stat().st_mtime)
        for path in files:  # what an earlier run left, oldest first
            if path.stem.split("-", 1)[1].isdigit():  # (a file named otherwise is not one of ours)
                self._sizes[int(path.stem.split("-", 1)[1])] = path.stat().st_size
        self.hits = self.misses = 0
        self._evict()

    def __getstate__(self) -> tuple[Path, int]:
        """Picklable (a DataLoader worker under spawn): the worker opens the same folder anew."""
        return self.folder, self.budget

    def __setstate__(self, state: tuple[Path, int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard}.npz"

    def get(self, shard: int) -> dict[str, np.ndarray] | None:
        """The shard's arrays when held here (it becomes the most recently used), else None."""
        with self._lock:
            if shard not in self._sizes:
                self.misses += 1
                return None
            self._sizes.move_to_end(shard)
            self.hits += 1
        try:
            with np.load(self.path(shard), allow_pickle=False) as f:
                return {name: f[name] for name in f.files}
        except Exception as err:  # gone, cut short or damaged (zip CRC): fetched again
            self.discard(shard, f"{type(err).__name__}: {err}")
            return None

    def discard(self, shard: int, why: str) -> None:
        """Delete a kept shard that failed a check (one warning line): the caller fetches it again."""
        with self._lock:
            self._sizes.pop(shard, None)
        if self.path(shard).exists():
            warn(f"the local copy {self.path(shard)} is damaged ({why}): fetching it again")
        self.path(shard).unlink(missing_ok=True)

    def put(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep a fetched shard (written to a temporary name, then renamed), evicting LRU shards."""
        self._save(self.path(shard), arrays)
        with self._lock:
            self._sizes[shard] = self.path(shard).stat().st_size
            self._sizes.move_to_end(shard)
            self._evict()

    def get_records(self, manifest_digest: str) -> dict[str, np.ndarray] | None:
        """The ids and done flags kept for the manifest with this digest, else None."""
        path = self.folder / RECORDS_FILE
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["manifest_digest"]) != manifest_digest:
                    return None
                return {name: f[name] for name in f.files if name != "manifest_digest"}
        except Exception as err:  # cut short or damaged (zip CRC, a member missing): fetched again
            warn(f"the local copy {path} is damaged ({type(err).__name__}: {err}): fetching it again")
            path.unlink(missing_ok=True)
            return None

    def put_records(self, manifest_digest: str, arrays: dict[str, np.ndarray]) -> None:
        self._save(self.folder / RECORDS_FILE, {"manifest_digest": np.array(manifest_digest), **arrays})

    def _save(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        """One .npz, written under a temporary name (this process and thread's), then renamed."""
        tmp = self.folder / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def _evict(self) -> None:
        while self._sizes and sum(self._sizes.values()) > self.budget:
            shard, _ = self._sizes.popitem(last=False)
            self.path(shard).unlink(missing_ok=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
