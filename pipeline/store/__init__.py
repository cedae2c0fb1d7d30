"""The logit cache: one Zarr v3 group per teacher x dataset split (the layout is in README "Cache format").

manifest      the manifest (frozen dataclasses <-> JSON attributes), content keys, names
encoding      codecs, float logits <-> the on-disk dtype
dense         LogitStore (open, create, write shards, read) and ShardWriter (background writes)
integrity     per-shard CRC32C and statistics, NaN/Inf checks, verify
lock          one writer per cache (flock)
housekeeping  finding caches under a root; what rm and gc may delete
views         the views layout: K augmented views per sample and their replay parameters
shard_cache   a far cache's shards kept on local disk (LRU, byte budget) while it streams lazily
"""

from pipeline.store.dense import MEMBERS, LogitStore, ShardWriter
from pipeline.store.encoding import CODECS, compressors, decode_logits, encode_logits
from pipeline.store.housekeeping import cache_like, find_caches, stale_entries
from pipeline.store.integrity import nonfinite_rows, row_stats, shard_digest
from pipeline.store.lock import cache_lock, holder
from pipeline.store.manifest import (
    DISK_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    DatasetInfo,
    Manifest,
    StorageInfo,
    TeacherInfo,
    cache_dirname,
    cache_key,
    inside,
    is_manifest,
    now_iso,
    safe_name,
    software_versions,
)
from pipeline.store.views import augment_spec, views_record

__all__ = [
    "augment_spec",
    "views_record",
    "CODECS",
    "DISK_DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MEMBERS",
    "DatasetInfo",
    "LogitStore",
    "Manifest",
    "ShardWriter",
    "StorageInfo",
    "TeacherInfo",
    "cache_dirname",
    "cache_key",
    "cache_like",
    "cache_lock",
    "compressors",
    "decode_logits",
    "encode_logits",
    "find_caches",
    "holder",
    "inside",
    "is_manifest",
    "nonfinite_rows",
    "now_iso",
    "row_stats",
    "safe_name",
    "shard_digest",
    "software_versions",
    "stale_entries",
]
