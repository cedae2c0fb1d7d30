"""The cache manifest (a frozen dataclass, stored as the group's JSON attributes), content keys and names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import KDError

FORMAT_NAME = "kd-logits"
FORMAT_VERSION = 2  # 2: per-shard stats and crc32c arrays, shard_crc32c in the manifest
VIEWS_FORMAT_VERSION = 3  # 3: the views layout (logits (N, K, C) + views (N, K, P)); dense caches stay 2
SPARSE_FORMAT_VERSION = 4  # 4: the sparse layout (per token top-k + logsumexp + samples, store/sparse.py;
# with a views entry: top-k per augmented view of a classification row)
READABLE_VERSIONS = (FORMAT_VERSION, VIEWS_FORMAT_VERSION, SPARSE_FORMAT_VERSION)
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
    # the views layout: {"count": K, "all": bool, "seed": s, "augment": {kind, pad, params}, "version": v};
    # empty: the dense layout, the one fixed view of each sample
    views: dict[str, Any] = field(default_factory=dict)
    # the sparse layout (store/sparse.py): {"k", "lse_temperatures", "samples", "sample_seed", "seq_len",
    # "vocab", "id_dtype", "version"}; empty: dense logits
    sparse: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        version = (
            SPARSE_FORMAT_VERSION if self.sparse else VIEWS_FORMAT_VERSION if self.views else FORMAT_VERSION
        )
        if self.format.get("version") != version:  # the layout decides the version it is written with
            object.__setattr__(self, "format", {"name": FORMAT_NAME, "version": version})

    @property
    def layout(self) -> str:
        return "sparse" if self.sparse else "views" if self.views else "dense"

    @property
    def task(self) -> str:
        """ "sequence" for a cache of token sequences (a language model's), else "classification"; the
        same word as `Split.task`."""
        return "sequence" if self.sparse and self.sparse.get("seq_len") else "classification"

    @property
    def num_views(self) -> int:
        return int(self.views["count"]) if self.views else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Manifest:
        fmt = raw.get("format", {})
        if fmt.get("name") != FORMAT_NAME:
            raise KDError("not a kd logit cache (its attributes have no kd-logits format marker)")
        if fmt.get("version") not in READABLE_VERSIONS:
            raise KDError(
                f"cache format version {fmt.get('version')} is not supported "
                f"(this kd reads {' and '.join(map(str, READABLE_VERSIONS))}): "
                "re-run `kd teacher-logits` or upgrade kd"
            )
        views, sparse = dict(raw.get("views", {})), dict(raw.get("sparse", {}))
        layout = "sparse" if sparse else "views" if views else "dense"
        wanted = {"sparse": SPARSE_FORMAT_VERSION, "views": VIEWS_FORMAT_VERSION, "dense": FORMAT_VERSION}
        if fmt.get("version") != wanted[layout] or (views and sparse.get("seq_len")):  # no views of text
            raise KDError(
                f"format version {fmt.get('version')} does not match its layout ({layout}): "
                "re-run `kd teacher-logits`"
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
            views=views,
            sparse=sparse,
        )

    @property
    def key(self) -> str:
        return cache_key(
            self.teacher.fingerprint, self.dataset, self.preprocessing, self.storage, self.views, self.sparse
        )

    @property
    def digest(self) -> str:
        """sha256 of the whole manifest, the shard checksums included: unlike the key (what was run, how
        it is stored), it changes whenever the cache's content does."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def cache_key(
    teacher_fingerprint: str,
    dataset: DatasetInfo,
    preprocessing: Mapping[str, Any],
    storage: StorageInfo,
    views: Mapping[str, Any] | None = None,
    sparse: Mapping[str, Any] | None = None,
) -> str:
    """Content address of a cache: what was run on what, and how it is stored (a dense cache's key has no
    views entry, so keys made before views existed are unchanged)."""
    record = {
        "teacher": teacher_fingerprint,
        "dataset": dataset.fingerprint,
        "split": dataset.split,
        "preprocessing": preprocessing,
        "storage": dataclasses.asdict(storage),
    }
    if views:
        record["views"] = dict(views)
    if sparse:  # likewise absent from dense and view keys
        record["sparse"] = dict(sparse)
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
    import torch  # here: the manifest module alone (a lock holder) need not import torch

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


def is_manifest(attrs: Mapping[str, Any]) -> bool:
    """Whether group attributes carry our format marker (any version): the group is a kd logit cache."""
    fmt = attrs.get("format")
    return isinstance(fmt, Mapping) and fmt.get("name") == FORMAT_NAME
