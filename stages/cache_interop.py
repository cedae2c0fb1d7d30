"""Move logits between our Zarr caches and HDF5 / npz files.

    kd cache export data/logits/<name>.zarr --format hdf5 --out logits.h5
    kd cache import logits.h5 --preset mnist1d --split train --teacher-name my-teacher

An export holds `logits` (the stored dtype; bfloat16 is widened to float32, HDF5 has no bfloat16),
`labels`, `index` and the manifest as a JSON attribute / entry; a view cache's export holds logits
(N, K, C) and `views` (N, K, P), the views' parameters, and imports back as a view cache; a sparse
cache's export holds every array of its layout (topk_ids, lse, ...) and imports back as one. An import
checks the file against the preset's dataset split (row count, and labels and ids when the file has
them), then writes a complete cache that `kd distill` finds by teacher name.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from pipeline import strict_json
from pipeline.config import Preset
from pipeline.data.datasets import load_split
from pipeline.errors import KDError
from pipeline.store import (
    DatasetInfo,
    LogitStore,
    Manifest,
    ShardWriter,
    StorageInfo,
    TeacherInfo,
    augment_spec,
    cache_dirname,
    cache_lock,
    decode_logits,
    now_iso,
    software_versions,
)
from pipeline.store.sparse import EXTRAS as SPARSE_EXTRAS
from pipeline.store.sparse import PAD_LABEL, sparse_lead, sparse_specs, stored_at, teacher_hits

console = Console(stderr=True, soft_wrap=True)
FORMATS = ("hdf5", "npz")


SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}


def export_format(out: Path, fmt: str | None) -> str:
    """The format to write: --format, else the one --out's extension names (else hdf5); an extension
    naming the other format is refused, so a file never holds what its name does not say."""
    named = SUFFIXES.get(out.suffix.lower())
    if fmt is not None and named is not None and fmt != named:
        raise KDError(f"--out {out} names an {named} file but --format is {fmt}: make them agree")
    return fmt or named or "hdf5"


def export(path: Path, out: Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise KDError(f"unknown export format '{fmt}': choose hdf5 or npz")
    store = LogitStore.open(path)
    store.require_complete()
    raw, labels, ids = store.read("logits"), store.read("labels"), store.ids.numpy()
    extra = store.read_extras()  # the layout's other arrays: views, or the sparse layout's
    dtype = store.manifest.storage.dtype
    logits = decode_logits(raw, dtype).numpy() if dtype == "bfloat16" else raw
    manifest = strict_json.dumps(store.manifest.to_dict())
    if out.is_dir():
        raise KDError(f"--out {out} is a folder: name the file to write, e.g. {out / 'logits.h5'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "hdf5":
        import h5py

        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "logits", data=logits, compression="gzip", chunks=(min(len(logits), 4096), *logits.shape[1:])
            )
            f.create_dataset("labels", data=labels)
            f.create_dataset("index", data=ids)
            for name, array in extra.items():
                f.create_dataset(name, data=array, compression="gzip")
            f.attrs["manifest"] = manifest
    else:
        with tmp.open("wb") as f:
            np.savez_compressed(
                f, logits=logits, labels=labels, index=ids, manifest=np.array(manifest), **extra
            )
    tmp.replace(out)
    shape = " x ".join(map(str, logits.shape))
    also = f", with {', '.join(extra)}" if extra else ""
    console.print(f"exported {path} -> {out} ({shape} {logits.dtype}{also})")
    return out


def import_(
    source: Path, preset: Preset, root: Path, *, split: str, teacher_name: str | None, force: bool = False
) -> Path:
    """A complete cache under `root` from an HDF5 or npz file of logits for `preset`'s `split`."""
    arrays, manifest = _read(source)
    if (manifest or {}).get("sparse") or "topk_ids" in arrays:
        return _import_sparse(source, arrays, manifest or {}, preset, root, split, teacher_name, force)
    logits = np.asarray(arrays["logits"])
    views_entry, params = _views_of(source, arrays, manifest, logits)
    if logits.ndim != (3 if views_entry else 2) or not np.issubdtype(logits.dtype, np.floating):
        raise KDError(f"{source}: 'logits' must be a 2-D float array, got {logits.dtype} {logits.shape}")
    for key in ("labels", "index"):
        if key in arrays:
            values = np.asarray(arrays[key])
            if values.shape != (len(logits),) or not np.issubdtype(values.dtype, np.integer):
                raise KDError(
                    f"{source}: '{key}' must be {len(logits)} integers (one per row of logits), got "
                    f"{values.dtype} {values.shape}"
                )
    bad = ~np.isfinite(logits.reshape(len(logits), -1)).all(1)
    if bad.any():
        rows = ", ".join(map(str, np.flatnonzero(bad)[:5].tolist()))
        raise KDError(
            f"{source}: {int(bad.sum())} rows of logits hold NaN or Inf (rows {rows}"
            f"{', ...' if bad.sum() > 5 else ''}): nothing imported; fix them at the source"
        )
    data = load_split(preset.dataset, split)
    n, c = logits.shape[0], logits.shape[-1]
    if n != len(data) or c != data.num_classes:
        raise KDError(
            f"{source} holds {n} x {c} logits but {data.dataset}/{split} has {len(data)} rows x "
            f"{data.num_classes} classes: import it with the preset and split it was computed on"
        )
    ids = np.asarray(arrays["index"], dtype=np.int64) if "index" in arrays else data.ids.numpy()
    if sorted(ids.tolist()) != sorted(data.ids.tolist()):
        raise KDError(
            f"{source}: its sample ids are not those of {data.dataset}/{split}: the rows would be "
            "joined to the wrong inputs"
        )
    by_id = {int(i): k for k, i in enumerate(ids)}
    pick = np.array([by_id[int(i)] for i in data.ids.tolist()])  # the file's row of each dataset row
    logits, ids = logits[pick], ids[pick]
    params = None if params is None else params[pick]
    if "labels" in arrays and not np.array_equal(
        np.asarray(arrays["labels"], dtype=np.int64)[pick], data.labels.numpy()
    ):
        raise KDError(f"{source}: its labels disagree with {data.dataset}/{split}: not the same data")

    teacher = _imported_teacher(source, manifest, teacher_name, logits)
    dtype = "float32" if logits.dtype == np.float32 or logits.dtype == np.float64 else "float16"
    new = Manifest(
        teacher=teacher,
        dataset=DatasetInfo(
            name=data.dataset, split=split, length=n, num_classes=c, fingerprint=data.fingerprint
        ),
        storage=_storage(preset, dtype, c),
        preprocessing={**data.preprocessing, "imported_from": source.name},
        software=software_versions(),
        created=now_iso(),
        views=views_entry,
    )
    path = root / cache_dirname(new)
    root.mkdir(parents=True, exist_ok=True)
    with cache_lock(path):
        store = LogitStore.create(path, new, overwrite=force)
        writer = ShardWriter(store)
        writer.add(torch.from_numpy(logits.astype(np.float32)), data.labels, torch.from_numpy(ids), params)
        writer.close()
        store.finish()
    console.print(
        f"imported {source} -> {path} ({n} x {c} {dtype}, teacher '{teacher.name}', accuracy "
        f"{store.manifest.teacher_accuracy:.2%})"
    )
    return path


def _views_of(
    source: Path, arrays: dict[str, Any], manifest: dict[str, Any] | None, logits: np.ndarray
) -> tuple[dict[str, Any], np.ndarray | None]:
    """(the manifest's views entry, the views' parameters) of an export of a view cache, checked against
    the logits; ({}, None) for a dense file."""
    entry = (manifest or {}).get("views") or {}
    if not entry and "views" not in arrays:
        return {}, None
    if not entry or "views" not in arrays:
        raise KDError(
            f"{source}: a view cache needs both the 'views' array and the manifest's views entry "
            "(as `kd cache export` writes them)"
        )
    params = np.asarray(arrays["views"])
    spec = augment_spec(entry, str(source))  # refused when it cannot be replayed
    k = int(entry.get("count", 0))
    if logits.ndim != 3 or params.shape != (len(logits), k, spec.num_params) or logits.shape[1] != k:
        raise KDError(
            f"{source}: logits {logits.shape} and views {params.shape} do not hold {k} views of "
            f"{spec.num_params} parameters per row, as its manifest says"
        )
    table = spec.enumerate()
    if (
        not np.issubdtype(params.dtype, np.integer)
        or (params < table.min(0)).any()
        or (params > table.max(0)).any()
    ):
        raise KDError(f"{source}: its view parameters are outside the range of augment '{spec.kind}'")
    return dict(entry), params.astype(np.int16)


def _read(source: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if not source.is_file():
        raise KDError(f"no file at {source}")
    if source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as f:  # data only: never unpickle someone else's file
                arrays = {k: f[k] for k in f.files}
        except ValueError as err:  # an object array needs pickle: refused
            raise KDError(f"{source} holds an array that needs pickle ({err}): save plain numbers") from None
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise KDError(f"{source} is not a readable .npz file ({err})") from None
        raw_manifest = str(arrays.pop("manifest")) if "manifest" in arrays else None
    else:
        import h5py

        try:
            with h5py.File(source, "r") as f:
                wanted = ("logits", "labels", "index", "views", *SPARSE_EXTRAS)
                arrays = {k: f[k][()] for k in wanted if k in f}
                raw_manifest = f.attrs.get("manifest")
        except (OSError, TypeError, ValueError) as err:
            raise KDError(f"{source} is not an HDF5 or .npz file of logits ({err})") from None
    if "logits" not in arrays:
        raise KDError(f"{source} has no 'logits' array: store the (N, C) logits under that name")
    try:
        manifest = json.loads(raw_manifest) if raw_manifest is not None else None
    except (ValueError, TypeError) as err:
        raise KDError(f"{source}: its 'manifest' is not valid JSON ({err}): remove it or fix it") from None
    if manifest is not None and not isinstance(manifest, dict):
        raise KDError(f"{source}: its 'manifest' is not a JSON object")
    return arrays, manifest


def _import_sparse(
    source: Path,
    arrays: dict[str, Any],
    manifest: dict[str, Any],
    preset: Preset,
    root: Path,
    split: str,
    teacher_name: str | None,
    force: bool,
) -> Path:
    """A sparse cache from its export (per token of a sequence, per classification row, or per view of
    a row): the manifest's sparse entry and every array of the layout, checked against the preset's data
    (ids, labels, shapes) before anything is written."""
    entry = manifest.get("sparse") or {}
    data = load_split(preset.dataset, split)
    if not entry:
        raise KDError(
            f"{source}: a sparse export needs its manifest's sparse entry (as `kd cache export` writes it)"
        )
    n, seq = len(data), int(data.labels.shape[1]) if data.task == "sequence" else 0
    if (entry.get("seq_len"), entry.get("vocab")) != (seq, data.num_classes):
        held, wanted = _rows_text(entry.get("seq_len"), entry.get("vocab")), _rows_text(seq, data.num_classes)
        raise KDError(
            f"{source} holds {held} but {data.dataset}/{split} has {wanted}: use the preset it was made with"
        )
    storage_dtype = manifest.get("storage", {}).get("dtype", "float16")
    if storage_dtype == "bfloat16":
        storage_dtype = "float32"  # exported widened
    views_entry, params = _views_of(source, arrays, manifest, np.asarray(arrays["logits"]))
    views = int(views_entry.get("count", 0))
    lead = sparse_lead(entry, views)
    specs = sparse_specs(entry, n, storage_dtype, views)
    expected = {"logits": ((n, *lead, entry["k"]), None), **specs}
    for name, (shape, _) in expected.items():
        if name not in arrays or tuple(np.shape(arrays[name])) != shape:
            got = tuple(np.shape(arrays[name])) if name in arrays else "nothing"
            raise KDError(f"{source}: '{name}' must have shape {shape}, got {got}")
    ids = np.asarray(arrays.get("index", data.ids.numpy()), dtype=np.int64)
    labels = np.asarray(arrays.get("labels", data.labels.numpy()), dtype=np.int64)
    if not np.array_equal(ids, data.ids.numpy()) or not np.array_equal(labels, data.labels.numpy()):
        raise KDError(f"{source}: its sample ids or labels are not those of {data.dataset}/{split}")
    values = np.asarray(arrays["logits"], dtype=np.float32)
    extras = {name: np.asarray(arrays[name]) for name in specs}
    if not (np.isfinite(values).all() and np.isfinite(extras["lse"]).all()):
        raise KDError(f"{source} holds NaN or Inf values: nothing imported; fix them at the source")
    teacher = _imported_teacher(source, manifest, teacher_name, values)
    new = Manifest(
        teacher=teacher,
        dataset=DatasetInfo(
            name=data.dataset,
            split=split,
            length=n,
            num_classes=data.num_classes,
            fingerprint=data.fingerprint,
        ),
        storage=_storage(
            preset, "float32" if storage_dtype == "float32" else "float16", int(np.prod(lead)) * entry["k"]
        ),
        preprocessing={**data.preprocessing, "imported_from": source.name},
        software=software_versions(),
        created=now_iso(),
        sparse=dict(entry),
        views=views_entry,
    )
    one = stored_at(entry["lse_temperatures"], 1.0)
    if one is None:
        raise KDError(f"{source} has no logsumexp at T = 1, which an imported cache needs (its perplexity)")
    # per row: the teacher's correct tokens (views), NLL at T = 1 and real tokens, as stage 1 records them
    hits, tokens = teacher_hits(extras["topk_ids"], labels)
    nll = (extras["lse"][..., one] - extras["target_logit"]).reshape(n, -1)
    real = np.broadcast_to(labels.reshape(n, -1), nll.shape) != PAD_LABEL
    stats = np.stack([hits, np.where(real, nll, 0.0).sum(1), tokens], 1).astype(np.float64)
    path = root / cache_dirname(new)
    root.mkdir(parents=True, exist_ok=True)
    with cache_lock(path):
        store = LogitStore.create(path, new, overwrite=force)
        writer = ShardWriter(store)
        sampled = extras.get("sampled_logits")
        if sampled is not None:
            extras["sampled_logits"] = torch.from_numpy(np.asarray(sampled, dtype=np.float32))
        writer.add(
            torch.from_numpy(values),
            torch.from_numpy(labels),
            torch.from_numpy(ids),
            params,
            extras=extras,
            stats=stats,
        )
        writer.close()
        store.finish()
    shape = f"{n} x {seq} tokens" if seq else f"{n} x {views} views" if views else f"{n} rows"
    console.print(
        f"imported {source} -> {path} (sparse, {shape}, top {entry['k']}, teacher '{teacher.name}')"
    )
    return path


def _rows_text(seq_len: Any, width: Any) -> str:
    return f"sequences of {seq_len} tokens over {width}" if seq_len else f"rows of {width} classes"


def _imported_teacher(
    source: Path, manifest: dict[str, Any] | None, teacher_name: str | None, values: np.ndarray
) -> TeacherInfo:
    """The teacher of an import: as the export's manifest names it (or --teacher-name); without a
    fingerprint, the sha256 of the imported values stands in for it."""
    teacher = (manifest or {}).get("teacher", {})
    teacher = teacher if isinstance(teacher, dict) else {}
    name = teacher_name or teacher.get("name")
    if not name:
        raise KDError(f"{source} names no teacher: pass --teacher-name")
    digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
    return TeacherInfo(
        name=name,
        architecture=teacher.get("architecture", {"imported_from": str(source)}),
        fingerprint=teacher.get("fingerprint") or f"imported-logits-sha256:{digest}",
        train_accuracy=teacher.get("train_accuracy"),
    )


def _storage(preset: Preset, dtype: str, row_width: int) -> StorageInfo:
    """An imported cache's storage: the preset's codec and shard size, chunks sized for its rows."""
    chunk_rows = preset.cache.chunk_rows_for(row_width)
    return StorageInfo(
        dtype=dtype,
        chunk_rows=chunk_rows,
        shard_rows=chunk_rows * preset.cache.shard_chunks,
        codec=preset.cache.codec,
        level=preset.cache.zstd_level,
    )
