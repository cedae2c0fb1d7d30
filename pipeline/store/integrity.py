"""Integrity of a cache: per-shard CRC32C and statistics as written, NaN/Inf refused, and `verify`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
import torch

from pipeline.errors import KDError
from pipeline.store.encoding import decode_logits
from pipeline.store.sparse import teacher_hits

if TYPE_CHECKING:
    from pipeline.store.dense import LogitStore


def shard_digest(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray, *more: np.ndarray) -> bytes:
    """CRC32C of a shard's stored logits bytes, labels and ids (then the views' parameters, in the views
    layout) in C order, 4 bytes big-endian. CRC32C finds
    bit flips and truncation at ~13 GB/s here (sha256: 1.8 GB/s, enough to slow streaming reads); the
    content address of a cache stays sha256."""
    crc = 0
    for array in (logits, labels, ids, *more):
        crc = google_crc32c.extend(crc, np.ascontiguousarray(array).tobytes())
    return int(crc).to_bytes(4, "big")


def row_stats(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per row (B, 3): correct (0/1), L2 norm, max softmax of float logits (B, C), each summed over the
    views of (B, K, C) logits; summed per shard."""
    logits = logits.float()
    if logits.dim() == 2:
        logits = logits[:, None]
    correct = (logits.argmax(-1) == labels[:, None]).double().sum(1)
    norms = logits.norm(dim=-1).double().sum(1)
    confidence = logits.softmax(-1).max(-1).values.double().sum(1)
    return torch.stack([correct, norms, confidence], 1).numpy()


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of (B, C) (or (B, K, C)) float logits holding any NaN or Inf."""
    return ~torch.isfinite(logits.reshape(len(logits), -1)).all(1)


# NaN and Inf are the values whose exponent bits are all ones: (unsigned view, exponent mask) per stored
# dtype (bfloat16 is stored as uint16 bits)
_EXPONENT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.uint16): (np.uint16, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def stored_nonfinite_rows(stored: np.ndarray) -> np.ndarray | None:
    """(B,) bool of the rows of a stored array (float16, bfloat16 bits or float32) holding any NaN or
    Inf, from the bits as stored (no float conversion: several times faster); None when every value is
    finite, the common case, decided in one pass."""
    bits, exponent = _EXPONENT_BITS[stored.dtype]
    masked = np.bitwise_and(stored.view(bits), bits(exponent))
    if masked.size == 0 or masked.max() != exponent:
        return None
    return (masked == exponent).reshape(len(stored), -1).any(1)


def summarize(shards: list[int], limit: int = 8) -> str:
    """'3 of 16 shards (0, 1, 2)': a count and the first few indices, never a list of thousands."""
    shown = ", ".join(map(str, shards[:limit])) + (", ..." if len(shards) > limit else "")
    return f"{len(shards)} shard{'s' if len(shards) != 1 else ''} ({shown})"


def verify(store: LogitStore) -> list[str]:
    """Every check, one line per problem: completeness (manifest flag and every shard's `done`), readable
    per-shard records, structure (shapes, dtypes, checksum list), then each shard re-read: its CRC32C
    against the manifest and the crc32c record, NaN/Inf, sample ids unique across the cache, and the
    teacher accuracy recomputed from the stored logits against the manifest's."""
    problems = []
    m = store.manifest
    damaged = store.damaged_records()
    for name, shards in damaged.items():
        problems.append(f"the '{name}' record of {summarize(shards)} cannot be read (damaged file)")
    missing = np.flatnonzero(~store.shards_done()).tolist()
    missing = [s for s in missing if s not in damaged.get("done", [])]
    if missing:
        problems.append(f"{summarize(missing)} of {store.num_shards} are not written")
    if missing or damaged:
        problems.append(
            "re-run `kd teacher-logits` with the same preset: it resumes, writing only those shards"
        )
    elif not m.complete:
        problems.append(
            "every shard is written but the manifest is not marked complete: re-run `kd teacher-logits`"
        )
    problems += store.structure_problems()
    if problems:
        return problems
    recorded_crc = store.shard_checksums()
    correct, checked, seen, repeated, unreadable = 0, 0, set(), [], 0
    for shard in range(store.num_shards):
        start, stop = store.shard_range(shard)
        rows = f"shard {shard} (rows {start}-{stop})"
        try:
            raw = np.asarray(store.array("logits")[start:stop])
            labels = np.asarray(store.array("labels")[start:stop])
            ids = np.asarray(store.array("index")[start:stop])
            extras = {name: np.asarray(store.array(name)[start:stop]) for name in store.extra_specs}
        except Exception as err:  # a damaged file can fail in the codec itself
            problems.append(f"{rows} cannot be read: {type(err).__name__}: {err}")
            unreadable += 1
            continue
        views = extras.get("views")
        try:
            store.check_shard(shard, raw, labels, ids, extras)
        except KDError:
            problems.append(f"{rows} fails its CRC32C checksum")
        if recorded_crc[shard] != m.shard_crc32c[shard]:
            problems.append(f"{rows}: its crc32c record disagrees with the manifest's checksum")
        logits = decode_logits(raw, m.storage.dtype)
        bad = int(nonfinite_rows(logits).sum())
        if bad:
            problems.append(f"{rows} has {bad} rows with NaN or Inf logits")
        if views is not None and views.size and not _replayable(views, store):
            problems.append(f"{rows} holds view parameters outside its augmentation's range")
        if m.sparse:  # the teacher's top token against each real next token
            if not np.isfinite(extras["lse"]).all():
                problems.append(f"{rows} has NaN or Inf logsumexps")
            hits, real = teacher_hits(extras["topk_ids"], labels)  # per token, view or row
            correct += int(hits.sum())
            checked += int(real.sum())
        else:
            predicted = logits.argmax(-1).view(len(labels), -1)  # (rows, K): every view's prediction
            correct += int((predicted == torch.from_numpy(labels)[:, None]).sum())
            checked += len(labels) * store.num_views
        id_list = ids.tolist()
        if len(set(id_list)) != len(id_list) or seen.intersection(id_list):
            repeated.append(shard)
        seen.update(id_list)
    if repeated:
        problems.append(f"sample ids repeat in {summarize(repeated)}: rows would join the wrong inputs")
    recorded = m.teacher_accuracy
    accuracy = correct / max(checked, 1)  # the manifest's is over every row: compared when all were read
    if recorded is not None and not unreadable and abs(accuracy - recorded) > 0.005:  # float16 may flip ties
        problems.append(
            f"labels disagree with the manifest: teacher accuracy from the stored logits is "
            f"{accuracy:.4f}, the manifest says {recorded:.4f}"
        )
    return problems


def _replayable(views: np.ndarray, store: LogitStore) -> bool:
    """Every stored parameter row is one of the augmentation's views."""
    table = store.augment.enumerate()  # (space, P)
    lo, hi = table.min(0), table.max(0)
    return bool(((views >= lo) & (views <= hi)).all())


def first_ids(ids: torch.Tensor, limit: int = 5) -> str:
    """The first ids of some rows, for a message: "3, 17, 40, ... 12 more"."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")
