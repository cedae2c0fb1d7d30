"""Reading a logit cache (`Reading`, the part of LogitStore that reads): arrays by rows, everything at
once (every shard checked against its CRC32C), shard by shard (through a far cache's local shard cache),
or streamed in shuffled whole-shard buffers decoded on a few threads; NaN/Inf refused; the sizes it holds
in memory and on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr

from pipeline.errors import KDError
from pipeline.store.encoding import as_tensor, decode_logits, stored_float
from pipeline.store.integrity import first_ids, stored_nonfinite_rows

DECODE_THREADS = min(4, os.cpu_count() or 1)  # blocks of a streamed buffer decoded at once


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer of a shuffled stream (LogitStore.iter_buffers): rows in storage order, float32 logits
    (or top-k values), sample ids and the layout's other arrays, and `order`, the shuffled order to take
    its rows in."""

    values: torch.Tensor
    ids: torch.Tensor
    extras: dict[str, np.ndarray]
    order: torch.Tensor


class Reading:
    """LogitStore's reads; the state they read (arrays, manifest, shard records) is LogitStore's."""

    @functools.cached_property
    def ids(self) -> torch.Tensor:
        """The sample ids (N,), read once (8 bytes a row), so streaming reads fetch logits alone."""
        held = self._held_records()
        return torch.from_numpy(held["index"] if held is not None else self.read("index"))

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of an array; a damaged file becomes a one-line KDError, not a codec trace.
        Reads of `logits` are counted in `logit_bytes_read` (what a stream cost, for tests and bench)."""
        try:
            values = np.asarray(self.array(name)[start:stop])
            if name == "logits":
                with self._count_lock:  # decode threads read side by side
                    self.logit_bytes_read += values.nbytes
            return values
        except KDError:
            raise
        except Exception as err:
            rows = "" if start is None else f" rows {start}-{stop}"
            raise KDError(
                f"cache {self.where}: '{name}'{rows} cannot be read ({type(err).__name__}: {err}): the "
                "file is damaged; rebuild it with `kd teacher-logits --force` or, for a copy, pull a sound "
                "one with `kd cache pull --force`; `kd cache verify` lists every problem"
            ) from None

    def read_views(self) -> np.ndarray | None:
        """The views' parameters (N, K, P) int16, or None for the dense layout."""
        return self.read("views") if self.manifest.views else None

    def read_extras(self) -> dict[str, np.ndarray]:
        """The layout's other arrays, whole ({} for the dense layout)."""
        return {name: self.read(name) for name in self.extra_specs}

    def read_all(self, *, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits float32 (N, C), (N, K, C) or, sparse, the top-k values (N, L, k), labels (N,) or (N, L),
        ids (N,)), each array read in one call; with `verify`, every shard is checked against its recorded
        CRC32C (hashing costs far less than the read). The layout's other arrays: read_extras()."""
        logits, labels, ids, _ = self.read_everything(verify=verify)
        return logits, labels, ids

    def read_everything(
        self, *, verify: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        """read_all() and read_extras() together, every shard checked against its CRC32C (what preload()
        read, when it ran)."""
        if verify and self._preloaded is not None:
            preloaded, self._preloaded = self._preloaded, None  # handed over once, never held twice
            return preloaded
        raw, labels, ids = self._read_by_shard("logits"), self.read("labels"), self.ids.numpy()
        extras = self.read_extras()
        if verify:
            for shard in range(self.num_shards):
                a, b = self.shard_range(shard)
                held = {name: values[a:b] for name, values in extras.items()}
                self.check_shard(shard, raw[a:b], labels[a:b], ids[a:b], held)
        self.refuse_nonfinite(raw, self.ids)
        logits = decode_logits(raw, self.manifest.storage.dtype)
        return logits, torch.from_numpy(labels), self.ids, extras

    def _read_by_shard(self, name: str) -> np.ndarray:
        """A whole array read shard by shard, so a file that cannot be decoded is named by its shard."""
        array = self.array(name)
        out = np.empty(array.shape, dtype=array.dtype)
        for shard in range(self.num_shards):
            a, b = self.shard_range(shard)
            try:
                out[a:b] = self.read(name, a, b)
            except KDError as err:
                raise KDError(f"shard {shard}: {err}") from None
        return out

    def preload(self) -> None:
        """Read everything now, every shard checked (read_everything): a damaged file fails here, where a
        local copy can still be fetched again; the next read_everything() returns what was read."""
        self._preloaded = self.read_everything(verify=True)

    def refuse_nonfinite(self, stored: np.ndarray, ids: torch.Tensor) -> None:
        """A KDError naming the rows when any stored logit is NaN or Inf (read from the bits as stored,
        before any float conversion): nobody trains on them."""
        bad = stored_nonfinite_rows(stored)
        if bad is not None:
            raise KDError(
                f"cache {self.where} holds NaN or Inf logits in {int(bad.sum())} rows (sample ids "
                f"{first_ids(ids[torch.from_numpy(bad)])}): refusing to train on it; "
                "rebuild it with `kd teacher-logits --force`"
            )

    def iter_buffers(
        self,
        generator: torch.Generator,
        *,
        block_rows: int | None = None,
        buffer_blocks: int = 4,
        shards: list[int] | None = None,
    ) -> Iterator[Buffer]:
        """Stream the cache in shuffled order without scattered reads: contiguous blocks (default a
        whole shard, the unit of storage, read in one call) in random order, `buffer_blocks` blocks a
        buffer, each buffer's rows to be taken in a random order of its own (`Buffer.order`). The next
        buffer is read by a background thread while this one is used; that thread also checks it for
        NaN/Inf (before any of its rows is yielded) and widens it to float32. Pass
        block_rows=chunk_rows to bound memory on huge shards. The blocks of a buffer are decoded by up to
        DECODE_THREADS threads at once (zstd and the checks release the GIL). `shards` (whole-shard
        blocks only): read just these, in this order (a DDP rank's share of an epoch)."""
        block = block_rows or self.shard_rows
        starts = list(range(0, self.num_rows, block))
        if shards is not None:
            assert block == self.shard_rows, "a list of shards needs whole-shard blocks"
            order = list(shards)
        else:
            order = torch.randperm(len(starts), generator=generator).tolist()
        buffers = [order[i : i + buffer_blocks] for i in range(0, len(order), buffer_blocks)]

        def read_into(out: torch.Tensor, i: int) -> dict[str, np.ndarray]:
            """Block i, checked, widened into `out` (its rows of the buffer); its other arrays."""
            a, b = starts[i], min(starts[i] + block, self.num_rows)
            if block == self.shard_rows:  # a whole shard: checked against its checksum as it streams
                raw, _, more = self.read_shard(i)
            else:
                raw = self.read("logits", a, b)
                more = {name: self.read(name, a, b) for name in self.extra_specs}
            self.refuse_nonfinite(raw, self.ids[a:b])
            out.copy_(stored_float(as_tensor(raw), dtype))  # the copy widens to float32
            return more

        def load(blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
            bounds = [(starts[i], min(starts[i] + block, self.num_rows)) for i in blocks]
            offsets = np.cumsum([0] + [b - a for a, b in bounds]).tolist()
            values = torch.empty((offsets[-1], *self.row_shape), dtype=torch.float32)
            slices = [values[offsets[j] : offsets[j + 1]] for j in range(len(blocks))]
            extras = list(readers.map(read_into, slices, blocks))  # blocks decoded side by side
            joined = {name: np.concatenate([e[name] for e in extras]) for name in self.extra_specs}
            return values, torch.cat([self.ids[a:b] for a, b in bounds]), joined

        dtype = self.manifest.storage.dtype
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-prefetch") as pool,
            ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="kd-decode") as readers,
        ):
            pending = pool.submit(load, buffers[0]) if buffers else None
            for k in range(len(buffers)):
                assert pending is not None
                values, ids, extras = pending.result()
                if k + 1 < len(buffers):
                    pending = pool.submit(load, buffers[k + 1])
                yield Buffer(values, ids, extras, torch.randperm(len(ids), generator=generator))

    def read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One shard's stored (logits, labels, the layout's other arrays by name), checked against its
        CRC32C: from the local shard cache when it holds them (a copy that fails the check is fetched
        again), else read from the store and then kept there."""
        a, b = self.shard_range(shard)
        ids = self.ids[a:b].numpy()
        held = self.shard_cache.get(shard) if self.shard_cache is not None else None
        if held is not None and all(name in held for name in ("logits", "labels", *self.extra_specs)):
            extras = {name: held[name] for name in self.extra_specs}
            try:
                self.check_shard(shard, held["logits"], held["labels"], ids, extras)
                return held["logits"], held["labels"], extras
            except KDError:  # a damaged local copy: the store's shard below replaces it
                assert self.shard_cache is not None
                self.shard_cache.discard(shard, "it fails the shard's CRC32C checksum")
        elif held is not None:  # a member missing
            assert self.shard_cache is not None
            self.shard_cache.discard(shard, "an array is missing")
        raw, labels = self.read("logits", a, b), self.read("labels", a, b)
        extras = {name: self.read(name, a, b) for name in self.extra_specs}
        self.check_shard(shard, raw, labels, ids, extras)
        if self.shard_cache is not None:
            self.shard_cache.put(shard, {"logits": raw, "labels": labels, **extras})
        return raw, labels, extras

    def memory_bytes(self) -> int:
        """What training holds in memory when it reads this cache whole: float32 logits of every class
        (a top-k classification cache is rebuilt to every class), or, for token sequences, the sparse
        arrays as read (values float32, ids int64)."""
        m = self.manifest
        if m.task != "sequence":
            return self.num_rows * self.num_views * self.num_classes * 4
        per_row = math.prod(self.row_shape) * 4 + sum(
            math.prod(shape[1:]) * (8 if name.endswith("ids") else 4)
            for name, (shape, _) in self.extra_specs.items()
        )
        return self.num_rows * per_row

    def nbytes_stored(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes on disk of `names` (default every array of the layout but the per-shard records). In a
        zip, from its directory: no member is read, so a damaged one still has a size."""
        names = names or ("logits", "labels", "index", "done", *self.extra_specs)
        store = self.group.store
        if isinstance(store, zarr.storage.ZipStore):
            with zipfile.ZipFile(store.path) as z:
                return sum(i.compress_size for i in z.infolist() if i.filename.split("/", 1)[0] in names)
        return sum(int(self.array(name).nbytes_stored()) for name in names)
