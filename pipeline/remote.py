"""Caches on shared and remote storage: fsspec URLs (s3://, gs://, ...), zip files, folders, file:// URLs.

A cache is a folder of files (Zarr v3), so moving one is copying files. Copies behave like `cp` and
`aws s3 cp`: a destination ending in `.zarr` or `.zip` is the cache itself, anything else is a folder
(prefix, bucket root) that receives `<dst>/<name>.zarr`. Only a previous copy of a kd cache is ever
replaced (with `force`), never other files, and a copy becomes visible only once complete: folders and
zip files are written under a temporary name and renamed; on object stores an upload record
(UPLOAD_RECORD: the cache's content key and manifest digest) goes first, the group metadata (the
manifest, with `complete`) last, and the record is removed once the copy is visible. What an interrupted
upload leaves (objects, no manifest) is recognised (`upload_remains`): a push of the same cache finishes
it, `kd cache gc` removes it. Reading a remote cache goes through a local read-through copy, checked
against its per-shard checksums before use. Credentials and endpoints
come from the usual environment of each filesystem (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for S3-compatible servers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from pipeline.backends import (
    ROOT_METADATA,
    TMP_MARK,
    filesystem,
    is_url,
    is_zip,
    local_path,
    occupied,
    root_attributes,
)
from pipeline.errors import KDError
from pipeline.faults import FaultPoint
from pipeline.store.housekeeping import cache_like
from pipeline.store.manifest import Manifest, is_manifest

UPLOAD_RECORD = ".kd-upload.json"  # beside an upload under way: {"key", "digest", "source", "host", ...}


def _is_kd_cache(location: str | Path) -> bool:
    """Whether `location` holds a kd cache (or, for local folders, the remains of one): what --force
    may replace."""
    if not (is_url(location) or is_zip(location)):
        return cache_like(Path(location))
    attrs = root_attributes(location)
    return attrs is not None and is_manifest(attrs)


def another_cache(source: Manifest, dst: str | Path) -> str | None:
    """What `dst` holds when it is a readable cache other than `source`'s (another content key): a short
    description for push and pull to refuse with. None when there is nothing readable there, or a copy
    of the same cache. (kd's own read-through copies are replaced whatever they hold.)"""
    theirs = root_attributes(local_path(dst))
    if not (theirs and is_manifest(theirs)):
        return None
    try:
        other = Manifest.from_dict(theirs)
        if other.key == source.key:
            return None
    except (KDError, KeyError, TypeError):  # another format version, or a manifest we cannot read
        return "a cache kd cannot read"
    return f"the cache of teacher '{other.teacher.name}' on {other.dataset.name} {other.dataset.split}"


def destination(src: str | Path, dst: str | Path, default_name: str) -> str | Path:
    """Where a copy of `src` lands: `dst` itself when it ends in .zarr or .zip, else `dst/<name>.zarr`
    (the source's name when it ends in .zarr or .zarr.zip, else `default_name`)."""
    dst = local_path(dst)
    text = str(dst).rstrip("/")
    if text.endswith((".zarr", ".zip")):
        return text if is_url(text) else Path(text)
    base = str(local_path(src)).rstrip("/").rsplit("/", 1)[-1]
    base = base[: -len(".zip")] if base.endswith(".zarr.zip") else base
    name = base if base.endswith(".zarr") else default_name
    return f"{text}/{name}" if is_url(text) else Path(text) / name


def copy_cache(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> None:
    """Copy a cache between any two of: a local folder, a URL folder, a zip file. `dst` is the cache
    itself (see `destination`); what is there is replaced only with `overwrite` and only when it is a
    kd cache (push and pull also refuse another cache: `another_cache`), except the remains of an
    interrupted upload of this same cache, which a copy finishes without `overwrite`; the copy becomes
    visible when complete."""
    src, dst = local_path(src), local_path(dst)
    if is_url(dst):  # one listing decides (a push of the same cache beside this one may be adding objects)
        objects = _objects(dst)
        remains = _remains(dst, objects)
        taken = bool(objects) and remains is None
    else:
        remains, taken = None, occupied(dst)
    if taken:
        if not _is_kd_cache(dst):
            raise KDError(
                f"{dst} exists and is not a logit cache: not replacing it (even with --force); "
                "choose another destination"
            )
        if not overwrite:
            raise KDError(f"{dst} already exists: pass --force to replace that cache")
    with tempfile.TemporaryDirectory(prefix="kd-copy-") as tmp:
        local = _materialize(src, Path(tmp) / "store")
        if remains is not None:
            _resume_upload(remains, local, dst)
        else:  # an object store with nothing there: nothing to clear (a push beside this one may start)
            _publish(local, dst, clear=taken or not is_url(dst))


@dataclasses.dataclass(frozen=True)
class Remains:
    """What an interrupted upload left at a URL: objects (relative path -> size) and no group metadata.
    `record`: its upload record (UPLOAD_RECORD; {} when unreadable), None when it has none (an upload by
    an earlier version of kd)."""

    url: str
    objects: dict[str, int]
    newest: float  # the newest object's modification time (seconds since the epoch), 0 when unknown
    record: dict[str, Any] | None

    @property
    def nbytes(self) -> int:
        return sum(self.objects.values())

    def describe(self) -> str:
        n = len(self.objects)
        what = f"an interrupted upload ({n} object{'s' * (n != 1)}, {self.nbytes:,} bytes, no manifest)"
        if self.record:
            what += f" of {self.record.get('source', '?')} from {self.record.get('host', '?')}"
        return what


def upload_remains(url: str | Path) -> Remains | None:
    """The remains of an interrupted upload at `url` (objects of a kd cache, no group metadata), else
    None: nothing there, a cache, or objects that are not a cache's (someone else's: never touched)."""
    return _remains(url, _objects(url)) if is_url(url) else None


def _objects(url: str | Path) -> dict[str, dict[str, Any]]:
    """Every object under a URL, by path relative to it, with fsspec's details: one listing."""
    fs, root = filesystem(str(url))
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root) + 1 :]: info for p, info in found.items() if p.startswith(root + "/")}


def _remains(url: str | Path, objects: dict[str, dict[str, Any]]) -> Remains | None:
    """Remains when `objects` (one listing of `url`) are a cache's members without its group metadata."""
    from pipeline.store.dense import MEMBERS

    if not objects or ROOT_METADATA in objects:
        return None
    if not {name.split("/", 1)[0] for name in objects} <= {*MEMBERS, UPLOAD_RECORD}:
        return None
    record = None
    if UPLOAD_RECORD in objects:
        fs, root = filesystem(str(url))
        try:
            record = json.loads(fs.cat_file(f"{root}/{UPLOAD_RECORD}"))
        except (OSError, ValueError):
            record = {}
        record = record if isinstance(record, dict) else {}
    sizes = {name: int(info.get("size") or 0) for name, info in objects.items() if name != UPLOAD_RECORD}
    newest = max((_mtime(info) for info in objects.values()), default=0.0)
    return Remains(str(url), sizes, newest, record)


def _mtime(info: dict[str, Any]) -> float:
    """An object's modification time from fsspec's details (S3: LastModified; local: mtime)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


def _same_upload(remains: Remains, local: Path) -> str:
    """'identical': an upload of exactly these files (its record names this manifest's digest); 'same':
    of this cache (its content key; without a record: every object one of these files, with its size);
    'other': of another cache, or of something kd cannot tell."""
    try:
        manifest = Manifest.from_dict(json.loads((local / ROOT_METADATA).read_bytes())["attributes"])
    except (OSError, ValueError, KeyError, TypeError, KDError):
        return "other"
    if remains.record is not None:
        if remains.record.get("digest") == manifest.digest:
            return "identical"
        return "same" if remains.record.get("key") == manifest.key else "other"
    for name, size in remains.objects.items():
        path = local / name
        if not path.is_file() or path.stat().st_size != size:
            return "other"
    return "same"


def _resume_upload(remains: Remains, local: Path, dst: str | Path) -> None:
    """Finish (or redo) an interrupted upload of this cache at `dst`; refuse the remains of another."""
    kind = _same_upload(remains, local)
    if kind == "other":
        root = str(dst).rstrip("/").rsplit("/", 1)[0]
        raise KDError(
            f"{dst} holds {remains.describe()} of another cache: not replacing it (even with --force); "
            f"remove it with `kd cache gc --root {root} --older-than 0 --yes`, or choose another destination"
        )
    # the same bytes (this very copy, interrupted, or another push of it running now): uploaded over in
    # place, nothing deleted, so a push running beside this one never loses an object; otherwise (a
    # re-dump of the same key) the remains go first
    _publish(local, dst, clear=kind != "identical")


def _materialize(src: str | Path, tmp: Path) -> Path:
    if is_url(src):
        fs, root = filesystem(str(src))
        files = [f for f in fs.find(root) if f.rsplit("/", 1)[-1] != UPLOAD_RECORD]
        if not files:
            raise KDError(f"nothing at {src}")
        for remote in files:
            target = tmp / remote[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        return tmp
    if is_zip(src):
        try:
            with zipfile.ZipFile(src) as z:
                for member in z.namelist():  # refuse members that would land outside the folder
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise KDError(f"{src}: member '{member}' would leave the cache folder")
                z.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as err:
            raise KDError(f"{src} is not a readable zip file ({err})") from None
        return tmp
    if not Path(src).is_dir():
        raise KDError(f"no cache at {src}")
    return Path(src)


def _files(local: Path) -> list[Path]:
    return sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def _publish(local: Path, dst: str | Path, *, clear: bool = True) -> None:
    files = _files(local)
    token = f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"
    if is_url(dst):
        fs, root = filesystem(str(dst))
        if clear:
            if fs.exists(f"{root}/{ROOT_METADATA}"):
                fs.rm_file(f"{root}/{ROOT_METADATA}")  # first: readers stop seeing the old cache
            if fs.exists(root):
                fs.rm(root, recursive=True)  # a kd cache (checked by the caller): only its own files
        metadata = local / ROOT_METADATA
        record = _upload_record(local, dst)
        fs.pipe_file(f"{root}/{UPLOAD_RECORD}", json.dumps(record).encode())  # first: names the upload
        for path in files:
            if path != metadata:
                fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
                _upload_fault()
        if _upload_digest(fs, root, str(dst)) != record["digest"]:
            raise KDError(  # another cache's push under the same name overtook this one: never mixed
                f"another upload to {dst} ran beside this one ({_describe_record(fs, root)}): this one "
                "stops before publishing; run it again once that one has finished"
            )
        fs.put_file(str(metadata), f"{root}/{ROOT_METADATA}")  # last: the copy is now visible
        with contextlib.suppress(FileNotFoundError):  # a push of the same cache beside this one was first
            fs.rm_file(f"{root}/{UPLOAD_RECORD}")
    elif is_zip(dst):
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + token)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # chunks are compressed
                for path in files:
                    z.write(path, path.relative_to(local).as_posix())
                    _upload_fault()
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = dst.with_name(dst.name + token), dst.with_name(dst.name + token + "-old")
        try:
            shutil.copytree(local, tmp, ignore=shutil.ignore_patterns("*.lock"), copy_function=_copy_file)
            if dst.exists():
                dst.rename(old)  # the previous copy of this cache, set aside until the new one is in place
            tmp.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def _upload_digest(fs: Any, root: str, url: str) -> str | None:
    """The manifest digest of the upload under way at `root` (its record), or, once a push of the same
    cache beside this one has published it (record removed), of the cache there; None when neither."""
    try:
        return str(json.loads(fs.cat_file(f"{root}/{UPLOAD_RECORD}")).get("digest"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return None
    attrs = root_attributes(url)
    try:
        return Manifest.from_dict(attrs).digest if attrs and is_manifest(attrs) else None
    except (KDError, KeyError, TypeError):
        return None


def _describe_record(fs: Any, root: str) -> str:
    try:
        record = json.loads(fs.cat_file(f"{root}/{UPLOAD_RECORD}"))
        return f"of {record.get('source')} from {record.get('host')}"
    except (OSError, ValueError, AttributeError):
        return "its record is gone: removed by `kd cache gc`?"


def _upload_record(local: Path, dst: str | Path) -> dict[str, Any]:
    """What an upload writes first: the content key and manifest digest of the cache it uploads, where
    from and when, so its remains can be told apart from another cache's, and named."""
    try:
        manifest = Manifest.from_dict(json.loads((local / ROOT_METADATA).read_bytes())["attributes"])
        key, digest = manifest.key, manifest.digest
    except (OSError, ValueError, KeyError, TypeError, KDError):
        key = digest = None
    record = {
        "key": key,
        "digest": digest,
        "source": str(local),
        "destination": str(dst),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }
    return record


_upload_fault = FaultPoint("KD_FAULT_AFTER_UPLOADS")  # tests kill a copy here (pipeline.faults)


def _copy_file(src: str, dst: str) -> None:
    shutil.copy2(src, dst)
    _upload_fault()


def remove_remains(remains: Remains) -> None:
    """Delete what an interrupted upload left (upload_remains found it: only a cache's objects)."""
    fs, root = filesystem(remains.url)
    fs.rm(root, recursive=True)
