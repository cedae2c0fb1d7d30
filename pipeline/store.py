"""LogitStore: one Zarr v3 group of raw teacher logits per teacher x dataset split.

Layout (readable with plain `zarr`, see README "Cache format"):

    zarr.json   group attributes = the manifest (JSON; `complete` is set last)
    logits/     (N, C) float16 | float32 | uint16 (bfloat16 bits); chunks (R, C), shards (S*R, C), zstd
    labels/     (N,) int64, chunked and sharded like logits
    index/      (N,) int64 dataset sample ids: the join key
    done/       (num_shards,) bool, one chunk per shard: set after that shard is fully written

A shard is the unit of writing (one writer per shard, whole shards at a time); a chunk is the unit of
reading. Only raw logits are stored: temperatures and transforms are applied at training time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import KDError

FORMAT_NAME = "kd-logits"
FORMAT_VERSION = 2  # 2: per-shard stats and crc32c arrays, shard_crc32c in the manifest
# The on-disk dtype of each storage dtype: zarr has no bfloat16, so its bits are kept as uint16.
DISK_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    architecture: dict[str, Any]
    fingerprint: str  # sha256 of weights + architecture record
    train_accuracy: float | None = None  # on the split it was trained on: a hint of how soft it is


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str
    length: int
    num_classes: int
    fingerprint: str  # sha256 of the split's ids, labels and inputs


@dataclass(frozen=True)
class StorageInfo:
    dtype: str
    chunk_rows: int
    shard_rows: int
    codec: str = "zstd"
    level: int = 3


@dataclass(frozen=True)
class Manifest:
    teacher: TeacherInfo
    dataset: DatasetInfo
    storage: StorageInfo
    preprocessing: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    created: str = ""
    teacher_accuracy: float | None = None  # teacher accuracy on this split, from the stored logits
    logit_stats: dict[str, float] = field(default_factory=dict)  # mean L2 norm, mean max-softmax
    shard_crc32c: list[str] = field(default_factory=list)  # per shard, hex: logits bytes + labels + ids
    complete: bool = False
    format: dict[str, Any] = field(default_factory=lambda: {"name": FORMAT_NAME, "version": FORMAT_VERSION})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Manifest:
        fmt = raw.get("format", {})
        if fmt.get("name") != FORMAT_NAME:
            raise KDError("not a kd logit cache (its attributes have no kd-logits format marker)")
        if fmt.get("version") != FORMAT_VERSION:
            raise KDError(
                f"cache format version {fmt.get('version')} is not supported "
                f"(this kd reads {FORMAT_VERSION}): "
                "re-run `kd teacher-logits` or upgrade kd"
            )
        return cls(
            teacher=TeacherInfo(**raw["teacher"]),
            dataset=DatasetInfo(**raw["dataset"]),
            storage=StorageInfo(**raw["storage"]),
            preprocessing=dict(raw.get("preprocessing", {})),
            software=dict(raw.get("software", {})),
            created=raw.get("created", ""),
            teacher_accuracy=raw.get("teacher_accuracy"),
            logit_stats=dict(raw.get("logit_stats", {})),
            shard_crc32c=list(raw.get("shard_crc32c", [])),
            complete=bool(raw.get("complete", False)),
            format=dict(fmt),
        )

    @property
    def key(self) -> str:
        return cache_key(self.teacher.fingerprint, self.dataset, self.preprocessing, self.storage)


def cache_key(
    teacher_fingerprint: str, dataset: DatasetInfo, preprocessing: Mapping[str, Any], storage: StorageInfo
) -> str:
    """Content address of a cache: what was run on what, and how it is stored."""
    record = {
        "teacher": teacher_fingerprint,
        "dataset": dataset.fingerprint,
        "split": dataset.split,
        "preprocessing": preprocessing,
        "storage": dataclasses.asdict(storage),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")


def safe_name(name: str, what: str = "name") -> str:
    """A name that is one path component and cannot leave its folder (no '/', no '..', no leading dot)."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise KDError(f"{what} '{name}' is not allowed: use letters, digits and _ . + = , - (no '/' or '..')")
    return name


def cache_dirname(manifest: Manifest) -> str:
    """`<teacher>.<dataset>.<split>.<key12>.zarr`: readable by people, unique by content."""
    parts = (manifest.teacher.name, manifest.dataset.name, manifest.dataset.split)
    for part in parts:
        safe_name(part, "cache name part")
    return f"{'.'.join(parts)}.{manifest.key[:12]}.zarr"


def inside(root: Path, name: str) -> Path:
    """root/name, refused when `name` would resolve outside `root` (path traversal)."""
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise KDError(f"'{name}' is not a cache directly under {root}: names cannot leave the cache root")
    return path


def software_versions() -> dict[str, str]:
    import numcodecs

    import pipeline

    return {
        "kd": pipeline.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def shard_digest(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> bytes:
    """CRC32C of a shard's stored logits bytes, labels and ids (C order), 4 bytes big-endian. CRC32C finds
    bit flips and truncation at ~13 GB/s here (sha256: 1.8 GB/s, enough to slow streaming reads); the
    content address of a cache stays sha256."""
    crc = 0
    for array in (logits, labels, ids):
        crc = google_crc32c.extend(crc, np.ascontiguousarray(array).tobytes())
    return int(crc).to_bytes(4, "big")


def row_stats(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per row (B, 3): correct (0/1), L2 norm, max softmax of float logits (B, C); summed per shard."""
    logits = logits.float()
    correct = (logits.argmax(1) == labels).double()
    return torch.stack(
        [correct, logits.norm(dim=1).double(), logits.softmax(1).max(1).values.double()], 1
    ).numpy()


# Testing hook: `KD_FAULT_AFTER_SHARDS=N` kills the process (SIGKILL, as kill -9) once N shards are done,
# so tests can interrupt stage 1 at exact points. Never set outside tests.
_FAULT_AFTER_SHARDS = (
    int(os.environ["KD_FAULT_AFTER_SHARDS"]) if os.environ.get("KD_FAULT_AFTER_SHARDS") else None
)
_written = 0


def _fault_injection(shard: int) -> None:
    global _written
    _written += 1
    if _FAULT_AFTER_SHARDS is not None and _written >= _FAULT_AFTER_SHARDS:
        os.kill(os.getpid(), signal.SIGKILL)


CODECS = ("zstd", "blosc-zstd", "blosc-bitshuffle")


def compressors(codec: str, level: int, itemsize: int) -> list[Any]:
    """Zarr v3 codecs by name: plain zstd, or Blosc-zstd after a byte (or bit) shuffle."""
    if codec == "zstd":
        return [ZstdCodec(level=level)]
    if codec in ("blosc-zstd", "blosc-bitshuffle"):
        shuffle = "shuffle" if codec == "blosc-zstd" else "bitshuffle"
        return [BloscCodec(cname="zstd", clevel=min(level, 9), shuffle=shuffle, typesize=itemsize)]
    raise KDError(f"unknown codec '{codec}': choose one of {', '.join(CODECS)}")


def encode_logits(logits: torch.Tensor, dtype: str) -> np.ndarray:
    """float logits (B, C) -> the on-disk array for a storage dtype."""
    if dtype == "bfloat16":
        return logits.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return logits.detach().to("cpu", getattr(torch, dtype)).numpy()


def decode_logits(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """The on-disk array -> float32 logits (B, C)."""
    return _to_float(_as_tensor(stored), dtype)


def _as_tensor(stored: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of an on-disk array (uint16 bfloat16 bits as int16)."""
    stored = np.ascontiguousarray(stored)
    return torch.from_numpy(stored.view(np.int16) if stored.dtype == np.uint16 else stored)


def _to_float(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    return (raw.view(torch.bfloat16) if dtype == "bfloat16" else raw).float()


class LogitStore:
    """A logit cache opened from a path or any zarr store (memory, local, zip, fsspec remote)."""

    def __init__(self, group: zarr.Group, where: str) -> None:
        self.group = group
        self.where = where
        self.manifest = Manifest.from_dict(group.attrs.asdict())
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """logits, labels, index or done; opened once (each group lookup re-reads the array's metadata)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
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
        n, c, st = manifest.dataset.length, manifest.dataset.num_classes, manifest.storage
        chunk, shard = st.chunk_rows, st.shard_rows  # may exceed n: zarr keeps edge chunks partial
        group.create_array(
            "logits",
            shape=(n, c),
            chunks=(chunk, c),
            shards=(shard, c),
            dtype=DISK_DTYPES[st.dtype],
            compressors=compressors(st.codec, st.level, np.dtype(DISK_DTYPES[st.dtype]).itemsize),
            fill_value=0,
        )
        for name in ("labels", "index"):  # 8 bytes a row: one chunk per shard, still one writer per shard
            group.create_array(
                name,
                shape=(n,),
                chunks=(shard,),
                shards=(shard,),
                dtype="int64",
                compressors=compressors(st.codec, st.level, 8),
                fill_value=-1,
            )
        num_shards = -(-n // shard)
        # per-shard records, one chunk per shard so that each has a single writer
        group.create_array("stats", shape=(num_shards, 3), chunks=(1, 3), dtype="float64", fill_value=0.0)
        group.create_array("crc32c", shape=(num_shards, 4), chunks=(1, 4), dtype="uint8", fill_value=0)
        group.create_array("done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False)
        group.attrs.put(dataclasses.replace(manifest, complete=False).to_dict())
        return cls(group, where)

    @property
    def num_rows(self) -> int:
        return int(self.array("logits").shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.array("logits").shape[1])

    @property
    def chunk_rows(self) -> int:
        return int(self.array("logits").chunks[0])

    @property
    def shard_rows(self) -> int:
        shards = self.array("logits").shards
        return int(shards[0]) if shards else self.chunk_rows

    @property
    def num_shards(self) -> int:
        return int(self.array("done").shape[0])

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
    ) -> None:
        """Write one whole shard (already encoded logits), its stats row (correct, sum of L2 norms, sum of
        max-softmax) and checksum, then mark it done: `done` is the last thing a shard writes."""
        start, stop = self.shard_range(shard)
        if logits.shape != (stop - start, self.num_classes):
            raise ValueError(
                f"shard {shard} needs {(stop - start, self.num_classes)} logits, got {logits.shape}"
            )
        self.array("logits")[start:stop] = logits
        self.array("labels")[start:stop] = labels
        self.array("index")[start:stop] = ids
        if stats is not None:
            self.array("stats")[shard] = stats
        self.array("crc32c")[shard] = np.frombuffer(shard_digest(logits, labels, ids), dtype=np.uint8)
        self.array("done")[shard] = True
        if _FAULT_AFTER_SHARDS is not None:
            _fault_injection(shard)

    def shards_done(self) -> np.ndarray:
        return np.asarray(self.array("done")[:], dtype=bool)

    def finish(self, **updates: Any) -> None:
        """Record the teacher's accuracy and logit statistics (summed from the per-shard records),
        the per-shard checksums, then `complete: true`, last, once every shard is done."""
        missing = np.flatnonzero(~self.shards_done())
        if missing.size:
            raise RuntimeError(f"cannot complete {self.where}: shards {missing.tolist()} are not written")
        totals = np.asarray(self.array("stats")[:]).sum(0)
        n = self.num_rows
        derived = {
            "teacher_accuracy": float(totals[0] / n),
            "logit_stats": {"mean_l2_norm": float(totals[1] / n), "mean_max_softmax": float(totals[2] / n)},
            "shard_crc32c": self.shard_checksums(),
        }
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
        from pipeline.remote import exists, zarr_store

        where = str(store)
        if isinstance(store, (str, Path)):
            if not exists(store):
                raise KDError(f"no logit cache at {where}: run `kd teacher-logits` first (or check the path)")
            store = zarr_store(store, writable=writable)
        try:
            group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
            raise KDError(
                f"{where} is not a Zarr v3 logit cache: run `kd teacher-logits` to make one"
            ) from None
        try:
            return cls(group, where)
        except KDError as err:
            raise KDError(f"{where}: {err}") from None
        except (KeyError, TypeError) as err:
            raise KDError(f"{where}: the manifest is malformed ({err}): re-run `kd teacher-logits`") from None

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
        expected = {
            "logits": ((n, c), DISK_DTYPES[m.storage.dtype]),
            "labels": ((n,), "int64"),
            "index": ((n,), "int64"),
            "done": ((self.num_shards,), "bool"),
        }
        for name, (shape, dtype) in expected.items():
            try:
                array = self.array(name)
            except (KeyError, FileNotFoundError, zarr.errors.BaseZarrError) as err:
                problems.append(f"array '{name}' is missing ({type(err).__name__})")
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

    def check_shard(self, shard: int, logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        """Raise KDError when a shard's data (as read) does not match its recorded checksum."""
        expected = self.manifest.shard_crc32c[shard] if shard < len(self.manifest.shard_crc32c) else None
        if expected is not None and shard_digest(logits, labels, ids).hex() != expected:
            raise KDError(
                f"cache {self.where}: shard {shard} fails its CRC32C checksum (damaged or truncated file): "
                "re-run `kd teacher-logits --force`, or `kd cache verify` for details"
            )

    def verify(self) -> list[str]:
        """Every check: completeness, structure, then each shard re-read: checksum, NaN/Inf, ids unique,
        and the teacher accuracy recomputed from the stored logits against the manifest's."""
        problems = []
        if not self.manifest.complete:
            problems.append("the manifest is not marked complete")
        missing = np.flatnonzero(~self.shards_done())
        if missing.size:
            problems.append(f"shards {missing.tolist()} are not written")
        problems += self.structure_problems()
        if problems:
            return problems
        correct, seen = 0, set()
        for shard in range(self.num_shards):
            start, stop = self.shard_range(shard)
            try:
                raw = np.asarray(self.array("logits")[start:stop])
                labels = np.asarray(self.array("labels")[start:stop])
                ids = np.asarray(self.array("index")[start:stop])
            except Exception as err:  # a damaged file can fail in the codec itself
                problems.append(
                    f"shard {shard} (rows {start}-{stop}) cannot be read: {type(err).__name__}: {err}"
                )
                continue
            try:
                self.check_shard(shard, raw, labels, ids)
            except KDError:
                problems.append(f"shard {shard} (rows {start}-{stop}) fails its CRC32C checksum")
            logits = decode_logits(raw, self.manifest.storage.dtype)
            bad = int((~torch.isfinite(logits)).any(1).sum())
            if bad:
                problems.append(f"shard {shard} has {bad} rows with NaN or Inf logits")
            correct += int((logits.argmax(1) == torch.from_numpy(labels)).sum())
            if len(seen.intersection(ids.tolist())) or len(set(ids.tolist())) != len(ids):
                problems.append(f"shard {shard} repeats sample ids")
            seen.update(ids.tolist())
        recorded = self.manifest.teacher_accuracy
        accuracy = correct / max(self.num_rows, 1)
        if recorded is not None and abs(accuracy - recorded) > 0.005:  # float16 rounding may flip rare ties
            problems.append(
                f"labels disagree with the manifest: teacher accuracy from the stored logits is "
                f"{accuracy:.4f}, the manifest says {recorded:.4f}"
            )
        return problems

    @functools.cached_property
    def ids(self) -> torch.Tensor:
        """The sample ids (N,), read once (8 bytes a row), so streaming reads fetch logits alone."""
        return torch.from_numpy(self.read("index"))

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of an array; a damaged file becomes a one-line KDError, not a codec trace."""
        try:
            return np.asarray(self.array(name)[start:stop])
        except KDError:
            raise
        except Exception as err:
            rows = "" if start is None else f" rows {start}-{stop}"
            raise KDError(
                f"cache {self.where}: '{name}'{rows} cannot be read ({type(err).__name__}: {err}): the "
                "file is damaged; run `kd cache verify`, then `kd teacher-logits --force` to rebuild it"
            ) from None

    def read_all(self, *, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits float32 (N, C), labels (N,), ids (N,)), each array read in one call; with `verify`,
        every shard is checked against its recorded CRC32C (hashing costs far less than the read)."""
        raw, labels, ids = self.read("logits"), self.read("labels"), self.ids.numpy()
        if verify:
            for shard in range(self.num_shards):
                a, b = self.shard_range(shard)
                self.check_shard(shard, raw[a:b], labels[a:b], ids[a:b])
        return decode_logits(raw, self.manifest.storage.dtype), torch.from_numpy(labels), self.ids

    def iter_shuffled(
        self, generator: torch.Generator, *, block_rows: int | None = None, buffer_blocks: int = 4
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream (logits, ids) in shuffled order without scattered reads: contiguous blocks (default a
        whole shard, the unit of storage, read in one call) in random order, then rows shuffled within a
        buffer of `buffer_blocks` blocks. The next buffer is read by a background thread while this one
        is used; rows are shuffled in the storage dtype, then converted. Pass block_rows=chunk_rows to
        bound memory on huge shards."""
        block = block_rows or self.shard_rows
        starts = list(range(0, self.num_rows, block))
        order = torch.randperm(len(starts), generator=generator).tolist()
        buffers = [order[i : i + buffer_blocks] for i in range(0, len(order), buffer_blocks)]

        def load(blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # (logits in storage dtype, ids)
            raws, ids = [], []
            for i in blocks:
                a, b = starts[i], min(starts[i] + block, self.num_rows)
                raw = self.read("logits", a, b)
                if block == self.shard_rows:  # a whole shard: check it against its checksum as it streams
                    self.check_shard(i, raw, self.read("labels", a, b), self.ids[a:b].numpy())
                raws.append(_as_tensor(raw))
                ids.append(self.ids[a:b])
            return torch.cat(raws), torch.cat(ids)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-prefetch") as pool:
            pending = pool.submit(load, buffers[0]) if buffers else None
            for k in range(len(buffers)):
                assert pending is not None
                raw, ids = pending.result()
                if k + 1 < len(buffers):
                    pending = pool.submit(load, buffers[k + 1])
                perm = torch.randperm(len(ids), generator=generator)
                yield _to_float(raw[perm], self.manifest.storage.dtype), ids[perm]  # gather, then widen

    def nbytes_stored(self) -> int:
        return sum(int(self.array(name).nbytes_stored()) for name in ("logits", "labels", "index", "done"))


class ShardWriter:
    """Takes rows in order, encodes them, and writes each full shard from a background thread,
    so the teacher computes the next batches while a shard is compressed and written. `shards` (default
    all, in order) lists the shards the rows fill, one after the other: a resumed dump passes the
    missing ones."""

    def __init__(self, store: LogitStore, shards: list[int] | None = None, max_pending: int = 2) -> None:
        self.store = store
        self.dtype = store.manifest.storage.dtype
        self.shards = list(range(store.num_shards)) if shards is None else list(shards)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._next = 0  # index into self.shards
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kd-shard-writer", daemon=True)
        self._thread.start()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Rows of float logits (B, C) with their labels and ids, continuing the current shard."""
        self._raise_if_failed()
        labels = labels.cpu()
        stats = row_stats(logits, labels)
        self._parts.append((encode_logits(logits, self.dtype), labels.numpy(), ids.cpu().numpy(), stats))
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
        logits, labels, ids, stats = (np.concatenate(a) for a in zip(*self._parts, strict=True))
        rest = (logits[rows:], labels[rows:], ids[rows:], stats[rows:])
        self._parts = [rest] if len(ids) > rows else []
        self._buffered = len(ids) - rows
        self._queue.put(
            (self.shards[self._next], logits[:rows], labels[:rows], ids[:rows], stats[:rows].sum(0))
        )
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


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """One writer per cache: an exclusive `<cache>.lock` file naming its pid and host. A lock left by
    a dead process on this host (kill -9) is taken over; a live one stops the second writer."""
    lock = path.with_name(path.name + ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                lock.unlink(missing_ok=True)  # stale: its writer died; resume will redo its shards
                continue
            raise KDError(
                f"cache {path} is being written by pid {owner.get('pid')} on {owner.get('host')} since "
                f"{owner.get('started')}: wait for it to finish (or delete {lock} if that process is gone)"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_entries(root: Path, older_than_hours: float) -> list[tuple[Path, str]]:
    """Entries under a cache root that `kd cache gc` removes: incomplete stores (no live writer) and
    orphans (lock files of dead writers, folders that are no cache), untouched for `older_than_hours`."""
    cutoff = time.time() - older_than_hours * 3600
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        newest = max(
            [path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")]
            if path.is_dir()
            else [path.stat().st_mtime]
        )
        if newest > cutoff:
            continue
        if path.suffix == ".lock":
            try:
                owner = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == socket.gethostname() and _alive(int(owner.get("pid", -1))):
                continue
            found.append((path, "lock of a writer that is gone"))
            continue
        if not path.is_dir():
            continue
        if path.with_name(path.name + ".lock").exists():
            continue  # being written (or its lock is collected first)
        try:
            store = LogitStore.open(path)
        except KDError:
            found.append((path, "not a readable logit cache"))
            continue
        if not (store.manifest.complete and store.shards_done().all()):
            found.append((path, f"incomplete ({int(store.shards_done().sum())}/{store.num_shards} shards)"))
    return found


def find_caches(
    root: Path | str,
    *,
    dataset_fingerprint: str | None = None,
    split: str | None = None,
    teacher: str | None = None,
) -> list[LogitStore]:
    """Complete caches under `root` matching the given fields, newest first."""
    from pipeline.remote import is_url, list_root

    found = []
    if is_url(root):
        entries: list[Any] = list_root(root)
    else:
        entries = sorted(Path(root).glob("*.zarr")) if Path(root).is_dir() else []
    for path in entries:
        try:
            store = LogitStore.open(path)
        except KDError:
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
        found.append(store)
    return sorted(found, key=lambda s: s.manifest.created, reverse=True)
