"""The logit cache: one Zarr v3 group per teacher x dataset split (the layout is in README "Cache format").

manifest      the manifest (frozen dataclasses <-> JSON attributes), content keys, names
encoding      codecs, float logits <-> the on-disk dtype
dense         LogitStore: create, per-shard records, open, checks (every layout)
reader        its reads: by rows, whole, by shard, streamed in shuffled buffers
writer        ShardWriter: shards written from a background thread
integrity     per-shard CRC32C and statistics, NaN/Inf checks, verify
lock          one writer per cache (flock)
housekeeping  finding caches under a root; what rm and gc may delete
views         the views layout: K augmented views per sample and their replay parameters
shard_cache   a far cache's shards kept on local disk (LRU, byte budget) while it streams lazily

Each name below is imported from its module on first use, so a process that needs only the lock or
the manifest does not import torch (~3 s).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "dense": ("MEMBERS", "LogitStore"),
    "writer": ("ShardWriter",),
    "encoding": ("CODECS", "compressors", "decode_logits", "encode_logits"),
    "housekeeping": ("cache_like", "find_caches", "stale_entries"),
    "integrity": ("nonfinite_rows", "row_stats", "shard_digest"),
    "lock": ("cache_lock", "holder"),
    "manifest": (
        "DISK_DTYPES",
        "FORMAT_NAME",
        "FORMAT_VERSION",
        "DatasetInfo",
        "Manifest",
        "StorageInfo",
        "TeacherInfo",
        "cache_dirname",
        "cache_key",
        "inside",
        "is_manifest",
        "now_iso",
        "safe_name",
        "software_versions",
    ),
    "views": ("augment_spec", "views_record"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value
