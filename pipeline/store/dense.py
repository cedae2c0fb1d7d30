"""LogitStore: one Zarr v3 group of raw teacher logits per teacher x dataset split, in every layout (dense,
views, sparse): creating it, its per-shard records, opening and the checks. Reading is
pipeline.store.reader's (`Reading`, which LogitStore extends); writing shards from a background thread
pipeline.store.writer's (`ShardWriter`).

The dense layout (readable with plain `zarr`, see README "Cache format"):

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
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.backends import exists, is_url, zarr_store
from pipeline.errors import KDError
from pipeline.faults import FaultPoint
from pipeline.store.encoding import compressors
from pipeline.store.integrity import shard_digest
from pipeline.store.manifest import DISK_DTYPES, Manifest
from pipeline.store.reader import Reading
from pipeline.store.shard_cache import ShardCache
from pipeline.store.sparse import EXTRAS as SPARSE_EXTRAS
from pipeline.store.sparse import create_sparse_arrays, sparse_lead, sparse_specs
from pipeline.store.views import augment_spec, create_views_array, expected_views_shape

RECORDS = ("done", "stats", "crc32c")  # per-shard arrays, one chunk per shard
# everything a cache folder holds (views: the views layout, store/views.py; the sparse layout's arrays:
# store/sparse.py)
MEMBERS = ("zarr.json", "logits", "labels", "index", "views", *SPARSE_EXTRAS, *RECORDS)
Extras = Mapping[str, np.ndarray]  # a shard's arrays beside logits, labels and ids, by name

_fault_injection = FaultPoint("KD_FAULT_AFTER_SHARDS")  # tests kill a dump here (pipeline.faults)


class LogitStore(Reading):
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
