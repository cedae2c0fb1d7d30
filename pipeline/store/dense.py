"""LogitStore: the dense layout, one Zarr v3 group of raw teacher logits per teacher x dataset split.

Layout (readable with plain `zarr`, see README "Cache format"):

    zarr.json   group attributes = the manifest (JSON; `complete` is set last)
    logits/     (N, C) float16 | float32 | uint16 (bfloat16 bits); chunks (R, C), shards (S*R, C), zstd
    labels/     (N,) int64, chunked and sharded like logits
    index/      (N,) int64 dataset sample ids: the join key
    stats/      (num_shards, 3) float64   crc32c/ (num_shards, 4) uint8   done/ (num_shards,) bool:
                per-shard records, one chunk per shard; `done` is set after the shard is fully written

A shard is the unit of writing (one writer per shard, whole shards at a time); a chunk is the unit of
reading. Only raw logits are stored: temperatures and transforms are applied at training time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
import threading
import zipfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.backends import exists, is_url, zarr_store
from pipeline.errors import KDError
from pipeline.faults import FaultPoint
from pipeline.store.encoding import as_tensor, compressors, decode_logits, encode_logits, stored_float
from pipeline.store.integrity import row_stats, shard_digest, stored_nonfinite_rows
from pipeline.store.manifest import DISK_DTYPES, Manifest
from pipeline.store.shard_cache import ShardCache
from pipeline.store.sparse import EXTRAS as SPARSE_EXTRAS
from pipeline.store.sparse import create_sparse_arrays, sparse_lead, sparse_specs
from pipeline.store.views import augment_spec, create_views_array, expected_views_shape

RECORDS = ("done", "stats", "crc32c")  # per-shard arrays, one chunk per shard
DECODE_THREADS = min(4, os.cpu_count() or 1)  # blocks of a streamed buffer decoded at once
# everything a cache folder holds (views: the views layout, store/views.py; the sparse layout's arrays:
# store/sparse.py)
MEMBERS = ("zarr.json", "logits", "labels", "index", "views", *SPARSE_EXTRAS, *RECORDS)
Extras = Mapping[str, np.ndarray]  # a shard's arrays beside logits, labels and ids, by name

_fault_injection = FaultPoint("KD_FAULT_AFTER_SHARDS")  # tests kill a dump here (pipeline.faults)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer of a shuffled stream (LogitStore.iter_buffers): rows in storage order, float32 logits
    (or top-k values), sample ids and the layout's other arrays, and `order`, the shuffled order to take
    its rows in."""

    values: torch.Tensor
    ids: torch.Tensor
    extras: dict[str, np.ndarray]
    order: torch.Tensor


class LogitStore:
    """A logit cache opened from a path or any zarr store (memory, local, zip, fsspec remote)."""

    def __init__(self, group: zarr.Group, where: str) -> None:
        self.group = group
        self.where = where
        self.manifest = Manifest.from_dict(group.attrs.asdict())
        self._arrays: dict[str, zarr.Array] = {}
        self.logit_bytes_read = 0
        self._count_lock = threading.Lock()
        self.shard_cache: ShardCache | None = None  # a far cache streamed lazily keeps shards here
        self._held: dict[str, np.ndarray] | None = None  # its ids and done flags, as kept there
        self._preloaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (DataLoader workers under spawn or forkserver): the lock is made again there."""
        state = dict(self.__dict__)
        del state["_count_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._count_lock = threading.Lock()

    def array(self, name: str) -> zarr.Array:
        """logits, labels, index or done; opened once (each group lookup re-reads the array's metadata)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except Exception as err:  # missing, or its metadata damaged
                raise KDError(
                    f"cache {self.where}: array '{name}' cannot be opened ({type(err).__name__}: {err}): "
                    "the cache is damaged; `kd cache verify` lists its problems"
                ) from None
        return self._arrays[name]

    # -- creating and writing ---------------------------------------------------------------------
    @classmethod
    def create(cls, store: Any, manifest: Manifest, *, overwrite: bool = False) -> LogitStore:
        """An empty store with every array allocated and `complete: false` in the manifest."""
        where = str(store)
        try:
            group = zarr.open_group(store, mode="w" if overwrite else "w-", zarr_format=3)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise KDError(f"a cache already exists at {where}: remove it or pass --force") from None
        n, st = manifest.dataset.length, manifest.storage
        chunk, shard = st.chunk_rows, st.shard_rows  # may exceed n: zarr keeps edge chunks partial
        row = _row_shape(manifest)  # (C,); views: (K, C); sparse: (L, k)
        group.create_array(
            "logits",
            shape=(n, *row),
            chunks=(chunk, *row),
            shards=(shard, *row),
            dtype=DISK_DTYPES[st.dtype],
            compressors=compressors(st.codec, st.level, np.dtype(DISK_DTYPES[st.dtype]).itemsize),
            fill_value=0,
        )
        for name in ("labels", "index"):  # 8 bytes a row: one chunk per shard, still one writer per shard
            per_row = _label_shape(manifest) if name == "labels" else ()
            group.create_array(
                name,
                shape=(n, *per_row),
                chunks=(shard, *per_row),
                shards=(shard, *per_row),
                dtype="int64",
                compressors=compressors(st.codec, st.level, 8),
                fill_value=-1,
            )
        num_shards = -(-n // shard)
        # per-shard records, one chunk per shard so that each has a single writer
        group.create_array("stats", shape=(num_shards, 3), chunks=(1, 3), dtype="float64", fill_value=0.0)
        group.create_array("crc32c", shape=(num_shards, 4), chunks=(1, 4), dtype="uint8", fill_value=0)
        group.create_array("done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False)
        if manifest.views:
            create_views_array(group, manifest, where)
        if manifest.sparse:
            create_sparse_arrays(group, manifest.sparse, n, st, _sparse_views(manifest))
        group.attrs.put(dataclasses.replace(manifest, complete=False).to_dict())
        return cls(group, where)

    @property
    def num_rows(self) -> int:
        return int(self.array("logits").shape[0])

    @property
    def num_classes(self) -> int:
        """Classes (the vocabulary, in the sparse layout, whose logits hold only the top k)."""
        if self.manifest.sparse:
            return int(self.manifest.dataset.num_classes)
        return int(self.array("logits").shape[-1])

    @functools.cached_property
    def extra_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{array: (shape, dtype)} of the layout's arrays beside logits, labels and index: none (dense),
        the views' parameters, or the sparse layout's token ids, logsumexps and samples. Each is written
        with its shard and covered by the shard's CRC32C, in this order."""
        m = self.manifest
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        if m.views:
            specs["views"] = (expected_views_shape(m), "int16")
        if m.sparse:  # a top-k cache of views has both, the views' parameters first
            specs |= sparse_specs(m.sparse, m.dataset.length, DISK_DTYPES[m.storage.dtype], _sparse_views(m))
        return specs

    @property
    def num_views(self) -> int:
        """K views per sample (1: the dense layout's fixed view)."""
        return self.manifest.num_views

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The stored logits of one sample: (C,); (K, C) for the views layout; (L, k) for the sparse one."""
        return _row_shape(self.manifest)

    @functools.cached_property
    def augment(self) -> Any:
        """The AugmentSpec that replays the views (kind "none" for the dense layout); refused when this
        version cannot replay it."""
        return augment_spec(self.manifest.views, self.where)

    @property
    def chunk_rows(self) -> int:
        return int(self.array("logits").chunks[0])

    @property
    def shard_rows(self) -> int:
        return self.manifest.storage.shard_rows  # the arrays are checked against it (structure_problems)

    @property
    def num_shards(self) -> int:
        return -(-self.manifest.dataset.length // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def write_shard(
        self,
        shard: int,
        logits: np.ndarray,
        labels: np.ndarray,
        ids: np.ndarray,
        stats: np.ndarray | None = None,
        extras: Extras | None = None,
    ) -> None:
        """Write one whole shard (already encoded logits, and the layout's other arrays by name in
        `extras`: the views' parameters, the sparse layout's ids, logsumexps and samples), its stats row
        (dense and views: correct, sum of L2 norms, sum of max-softmax over every view; sparse: correct
        tokens, NLL, tokens) and checksum, then mark it done: `done` is the last thing a shard writes."""
        start, stop = self.shard_range(shard)
        if logits.shape != (stop - start, *self.row_shape):
            want = (stop - start, *self.row_shape)
            raise ValueError(f"shard {shard} needs {want} logits, got {logits.shape}")
        extras = dict(extras or {})
        if set(extras) != set(self.extra_specs):
            layout = self.manifest.layout
            raise ValueError(f"shard {shard}: the {layout} layout needs {list(self.extra_specs)}")
        self.array("logits")[start:stop] = logits
        self.array("labels")[start:stop] = labels
        self.array("index")[start:stop] = ids
        ordered = [np.asarray(extras[name], dtype=dtype) for name, (_, dtype) in self.extra_specs.items()]
        for name, values in zip(self.extra_specs, ordered, strict=True):
            self.array(name)[start:stop] = values
        if stats is not None:
            self.array("stats")[shard] = stats
        digest = shard_digest(logits, labels, ids, *ordered)
        self.array("crc32c")[shard] = np.frombuffer(digest, dtype=np.uint8)
        self.array("done")[shard] = True
        _fault_injection()

    def records(self, name: str) -> tuple[np.ndarray, list[int]]:
        """A per-shard record array (done, stats or crc32c) and the shards whose chunk cannot be read
        (a damaged file): those read as the fill value, so a damaged `done` means "not done"."""
        try:
            array = self.array(name)
        except KDError:  # the record's metadata itself is gone or damaged: no shard's record is readable
            width = {"done": (), "stats": (3,), "crc32c": (4,)}[name]
            dtype = {"done": bool, "stats": np.float64, "crc32c": np.uint8}[name]
            return np.zeros((self.num_shards, *width), dtype=dtype), list(range(self.num_shards))
        try:
            return np.asarray(array[:]), []
        except Exception:  # a damaged chunk fails in the codec: read the others one by one
            values = np.full(array.shape, array.fill_value, dtype=array.dtype)
            damaged = []
            for shard in range(array.shape[0]):
                try:
                    values[shard] = array[shard]
                except Exception:
                    damaged.append(shard)
            return values, damaged

    def damaged_records(self) -> dict[str, list[int]]:
        """{record name: shards whose chunk of it cannot be read}, for the records that have any."""
        return {name: damaged for name in RECORDS if (damaged := self.records(name)[1])}

    def shards_done(self) -> np.ndarray:
        """(num_shards,) bool: shards fully written (an unreadable `done` chunk counts as not done)."""
        held = self._held_records()
        done = held["done"] if held is not None else self.records("done")[0]
        return np.asarray(done, dtype=bool)

    def _held_records(self) -> dict[str, np.ndarray] | None:
        """A complete far cache streamed through a shard cache: its `done` flags and sample ids, kept
        in the shard cache under the digest of this manifest (see shard_cache), fetched when absent.
        None for every other cache (read from the store each time)."""
        if self.shard_cache is None or not self.manifest.complete:
            return None
        if self._held is None:
            held = self.shard_cache.get_records(self.manifest.digest)
            if held is None:
                held = {"done": self.records("done")[0], "index": self.read("index")}
                if held["done"].all():  # only a complete cache's records are kept
                    self.shard_cache.put_records(self.manifest.digest, held)
            self._held = held
        return self._held

    def shards_to_write(self) -> list[int]:
        """What a resumed dump (re)writes: shards not done, and shards with any unreadable record."""
        redo = set(np.flatnonzero(~self.shards_done()).tolist())  # an unreadable `done` reads as not done
        for name in ("stats", "crc32c"):
            redo.update(self.records(name)[1])
        return sorted(redo)

    @property
    def is_complete(self) -> bool:
        """The manifest's `complete` flag *and* every shard's `done` flag (both halves)."""
        return self.manifest.complete and bool(self.shards_done().all())

    @property
    def is_intact(self) -> bool:
        """Complete, and every per-shard record readable: a cache hit, `complete yes` in ls and info."""
        return self.manifest.complete and not self.shards_to_write()

    def reopen_for_writing(self) -> None:
        """Before shards of a store are rewritten: clear `complete`, so no reader trusts it meanwhile."""
        if self.manifest.complete:
            self.manifest = dataclasses.replace(self.manifest, complete=False)
            self.group.attrs.put(self.manifest.to_dict())

    def finish(self, **updates: Any) -> None:
        """Record the teacher's accuracy and logit statistics (summed from the per-shard records),
        the per-shard checksums, then `complete: true`, last, once every shard is done."""
        redo = self.shards_to_write()
        if redo:
            raise KDError(
                f"cannot complete {self.where}: shards {redo} are not written (or their records are "
                "unreadable): re-run `kd teacher-logits` to write them"
            )
        totals = np.asarray(self.array("stats")[:]).sum(0)
        if self.manifest.sparse:  # per shard: correct tokens, NLL (T = 1), real tokens
            tokens = max(float(totals[2]), 1.0)
            accuracy = float(totals[0] / tokens)
            stats = {"perplexity": float(np.exp(totals[1] / tokens)), "tokens": int(totals[2])}
        else:
            n = self.num_rows * self.num_views  # the stats sum over every view of every row
            accuracy = float(totals[0] / n)
            stats = {"mean_l2_norm": float(totals[1] / n), "mean_max_softmax": float(totals[2] / n)}
        derived = {"teacher_accuracy": accuracy, "logit_stats": stats, "shard_crc32c": self.shard_checksums()}
        self.manifest = dataclasses.replace(self.manifest, **{**derived, **updates})
        self.group.attrs.put(self.manifest.to_dict())
        self.manifest = dataclasses.replace(self.manifest, complete=True)
        self.group.attrs.put(self.manifest.to_dict())

    def shard_checksums(self) -> list[str]:
        return [bytes(row).hex() for row in np.asarray(self.array("crc32c")[:], dtype=np.uint8)]

    # -- opening and reading ----------------------------------------------------------------------
    @classmethod
    def open(cls, store: Any, *, writable: bool = False) -> LogitStore:
        """A cache at a local path, a `.zip` file, an fsspec URL (s3://...) or any zarr store."""
        where = str(store)
        if isinstance(store, (str, Path)):
            if not exists(store):
                raise KDError(f"no logit cache at {where}: run `kd teacher-logits` first (or check the path)")
            try:
                store = zarr_store(store, writable=writable)
            except KDError:
                raise
            except Exception as err:  # a corrupt zip file
                raise KDError(f"{where} cannot be opened ({type(err).__name__}: {err})") from None
        try:
            group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
            raise KDError(
                f"{where} is not a Zarr v3 logit cache: run `kd teacher-logits` to make one"
            ) from None
        except Exception as err:  # unreadable metadata, a permission problem, a server error
            raise KDError(f"{where} cannot be opened ({type(err).__name__}: {err})") from None
        try:
            return cls(group, where)
        except KDError as err:
            raise KDError(f"{where}: {err}") from None
        except Exception as err:
            raise KDError(
                f"{where}: the manifest is malformed ({type(err).__name__}: {err}): "
                "re-run `kd teacher-logits`"
            ) from None

    def require_complete(self) -> None:
        """The cheap checks training runs before the first batch: complete, shaped as its manifest says."""
        if not self.manifest.complete or not self.shards_done().all():
            done = int(self.shards_done().sum())
            raise KDError(
                f"cache {self.where} is incomplete ({done}/{self.num_shards} shards written): "
                "re-run `kd teacher-logits` to finish it"
            )
        problems = self.structure_problems()
        if problems:
            raise KDError(
                f"cache {self.where} is damaged: {problems[0]}; run `kd cache verify` for the full list"
            )

    def structure_problems(self) -> list[str]:
        """Shapes, dtypes and checksum records against the manifest: no array data is read."""
        m, problems = self.manifest, []
        n, c = m.dataset.length, m.dataset.num_classes
        row = self.row_shape if m.sparse else (*self.row_shape[:-1], c)
        expected = {
            "logits": ((n, *row), DISK_DTYPES[m.storage.dtype]),
            "labels": ((n, *_label_shape(m)), "int64"),
            "index": ((n,), "int64"),
            "done": ((self.num_shards,), "bool"),
            **self.extra_specs,
        }
        for name, (shape, dtype) in expected.items():
            try:
                array = self.array(name)
            except KDError:
                problems.append(f"array '{name}' is missing or its metadata is damaged")
                continue
            if tuple(array.shape) != shape:
                problems.append(f"array '{name}' has shape {tuple(array.shape)}, the manifest says {shape}")
            if np.dtype(array.dtype) != np.dtype(dtype):
                problems.append(
                    f"array '{name}' is {array.dtype}, the manifest's storage dtype needs {dtype}"
                )
        if m.complete and len(m.shard_crc32c) != self.num_shards:
            problems.append(
                f"the manifest lists {len(m.shard_crc32c)} shard checksums for {self.num_shards} shards"
            )
        return problems

    def check_shard(
        self,
        shard: int,
        logits: np.ndarray,
        labels: np.ndarray,
        ids: np.ndarray,
        extras: Extras | None = None,
    ) -> None:
        """Raise KDError when a shard's data (as read) does not match its recorded checksum. `extras`: the
        layout's other arrays by name."""
        expected = self.manifest.shard_crc32c[shard] if shard < len(self.manifest.shard_crc32c) else None
        held = extras or {}
        extra = [held[name] for name in self.extra_specs if name in held]
        if expected is not None and shard_digest(logits, labels, ids, *extra).hex() != expected:
            fix = (
                f"push a sound copy to it (`kd cache push CACHE {self.where} --force`)"
                if is_url(self.where)  # the far copy itself
                else "rebuild it with `kd teacher-logits --force` or, for a copy, pull a sound one with "
                "`kd cache pull --force`"
            )
            raise KDError(
                f"cache {self.where}: shard {shard} fails its CRC32C checksum (damaged or truncated file): "
                f"{fix}; `kd cache verify` lists every problem"
            )

    def verify(self) -> list[str]:
        """Every check, each problem a line (empty: the cache is sound); see integrity.verify."""
        from pipeline.store.integrity import verify

        return verify(self)

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
        raw, labels, ids = self.read("logits"), self.read("labels"), self.ids.numpy()
        extras = self.read_extras()
        if verify:
            for shard in range(self.num_shards):
                a, b = self.shard_range(shard)
                held = {name: values[a:b] for name, values in extras.items()}
                self.check_shard(shard, raw[a:b], labels[a:b], ids[a:b], held)
        self.refuse_nonfinite(raw, self.ids)
        logits = decode_logits(raw, self.manifest.storage.dtype)
        return logits, torch.from_numpy(labels), self.ids, extras

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
                f"{_first_ids(ids[torch.from_numpy(bad)])}): refusing to train on it; "
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
        if not (m.sparse and m.sparse["seq_len"]):
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
                f"{int(bad.sum())} rows (sample ids {_first_ids(ids[bad])}): {self.store.where} is left "
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


def _row_shape(manifest: Manifest) -> tuple[int, ...]:
    """The stored logits of one sample: (C,); (K, C) for the views layout; (L, k) for the sparse one
    ((k,) for a classification row, (K, k) for its K views)."""
    if manifest.sparse:
        return (*sparse_lead(manifest.sparse, _sparse_views(manifest)), manifest.sparse["k"])
    if manifest.views:
        return (manifest.num_views, manifest.dataset.num_classes)
    return (manifest.dataset.num_classes,)


def _sparse_views(manifest: Manifest) -> int:
    """K views a row of a top-k cache of augmented views; 0 without views."""
    return manifest.num_views if manifest.views else 0


def _label_shape(manifest: Manifest) -> tuple[int, ...]:
    """Labels per sample beyond the first axis: () for one label a row, (L,) for a sequence's tokens."""
    return (manifest.sparse["seq_len"],) if manifest.sparse and manifest.sparse["seq_len"] else ()


def _first_ids(ids: torch.Tensor, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")
