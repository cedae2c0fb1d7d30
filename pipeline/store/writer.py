"""Writing a logit cache's shards: rows taken in order, encoded, and each full shard written from a
background thread (one writer per shard, the unit of writing) while the teacher computes the next."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.errors import KDError
from pipeline.store.dense import LogitStore
from pipeline.store.encoding import encode_logits
from pipeline.store.integrity import first_ids, row_stats, stored_nonfinite_rows
from pipeline.store.manifest import DISK_DTYPES


class ShardWriter:
    """Takes rows in order, encodes them, and writes each full shard from a background thread,
    so the teacher computes the next batches while a shard is compressed and written. `shards` (default
    all, in order) lists the shards the rows fill, one after the other: a resumed dump passes the
    missing ones."""

    def __init__(self, store: LogitStore, shards: list[int] | None = None, max_pending: int = 2) -> None:
        self.store = store
        self.dtype = store.manifest.storage.dtype
        self.shards = list(range(store.num_shards)) if shards is None else list(shards)
        self._parts: list[dict[str, np.ndarray]] = []  # blocks of logits, labels, ids, stats[, extras]
        self._buffered = 0
        self._next = 0  # index into self.shards
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kd-shard-writer", daemon=True)
        self._thread.start()

    def add(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ids: torch.Tensor,
        views: np.ndarray | None = None,
        *,
        extras: Mapping[str, Any] | None = None,
        stats: np.ndarray | None = None,
    ) -> None:
        """Rows of float logits (B, C) with their labels and ids, continuing the current shard; in the
        views layout logits (B, K, C) and the views' parameters (B, K, P); in the sparse layout the
        top-k values (B, L, k), the other arrays in `extras` and the rows' `stats` (B, 3)."""
        self._raise_if_failed()
        labels, ids = labels.cpu(), ids.cpu()
        encoded = encode_logits(logits, self.dtype)
        bad = stored_nonfinite_rows(encoded)  # NaN or Inf as computed, or |z| > 65504 overflowing float16
        if bad is not None:
            bad = torch.from_numpy(bad)
            raise KDError(
                f"the teacher's logits are NaN or Inf{' in float16' if self.dtype == 'float16' else ''} for "
                f"{int(bad.sum())} rows (sample ids {first_ids(ids[bad])}): {self.store.where} is left "
                "incomplete; check the teacher and its inputs"
                + (" or store float32 (--dtype float32)" if self.dtype == "float16" else "")
            )
        part = {
            "logits": encoded,
            "labels": labels.numpy(),
            "ids": ids.numpy(),
            "stats": row_stats(logits, labels) if stats is None else stats,
        }
        if views is not None:
            part["views"] = np.asarray(views, dtype=np.int16)
        for name, values in (extras or {}).items():
            dtype = self.store.extra_specs[name][1]
            if name.endswith("logits") and dtype == DISK_DTYPES[self.dtype] and torch.is_tensor(values):
                part[name] = encode_logits(values, self.dtype)  # raw logits: the storage dtype
            else:
                part[name] = np.asarray(values.numpy() if torch.is_tensor(values) else values, dtype=dtype)
        self._parts.append(part)
        self._buffered += len(ids)
        while self._next < len(self.shards):
            start, stop = self.store.shard_range(self.shards[self._next])
            if self._buffered < stop - start:
                break
            self._submit(stop - start)

    def close(self) -> None:
        """Flush, wait for every shard to be written, and re-raise a writer failure here."""
        try:
            if self._buffered:
                raise ValueError(f"{self._buffered} rows left over past the last shard")
        finally:
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop after the shards already queued (a failure elsewhere): the store stays incomplete."""
        self._queue.put(None)
        self._thread.join()

    def _submit(self, rows: int) -> None:
        parts = {name: np.concatenate([p[name] for p in self._parts]) for name in self._parts[0]}
        left = len(parts["ids"]) - rows
        self._parts = [{name: a[rows:] for name, a in parts.items()}] if left > 0 else []
        self._buffered = left
        head = {name: a[:rows] for name, a in parts.items()}
        logits, labels, ids, stats = (head.pop(name) for name in ("logits", "labels", "ids", "stats"))
        self._queue.put((self.shards[self._next], logits, labels, ids, stats.sum(0), head))
        self._next += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.store.write_shard(*item)
                except BaseException as err:  # handed to the main thread in add()/close()
                    self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
