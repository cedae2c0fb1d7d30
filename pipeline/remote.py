"""Caches on shared and remote storage: fsspec URLs (s3://, gs://, file://, ...), zip files, folders.

A cache is a folder of files (Zarr v3), so moving one is copying files; reading a remote one goes
through a local read-through copy, checked against its per-shard checksums before use. Credentials and
endpoints come from the usual environment of each filesystem (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible servers).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import zarr

from pipeline.errors import KDError


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def is_zip(location: str | Path) -> bool:
    return str(location).endswith(".zip")


def zarr_store(location: str | Path, *, writable: bool = False) -> Any:
    """What zarr opens for a location: a URL string (fsspec), a ZipStore, or a local path."""
    if is_url(location):
        return str(location)
    if is_zip(location):
        if not Path(location).is_file():
            raise KDError(f"no zip file at {location}")
        return zarr.storage.ZipStore(str(location), mode="a" if writable else "r")
    return Path(location)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise KDError(f"cannot open {url}: {err} (install the fsspec filesystem for this protocol)") from None


def exists(location: str | Path) -> bool:
    if is_url(location):
        fs, path = _fs(str(location))
        return bool(fs.exists(path.rstrip("/") + "/zarr.json"))
    return Path(location).exists()


def copy_cache(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> None:
    """Copy a cache between any two of: a local folder, a URL folder, a zip file."""
    if exists(dst) and not overwrite:
        raise KDError(f"{dst} already exists: pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="kd-copy-") as tmp:
        local = _materialize(src, Path(tmp) / "store")
        _publish(local, dst)


def _materialize(src: str | Path, tmp: Path) -> Path:
    if is_url(src):
        fs, root = _fs(str(src))
        root = root.rstrip("/")
        files = fs.find(root)
        if not files:
            raise KDError(f"nothing at {src}")
        for remote in files:
            target = tmp / remote[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        return tmp
    if is_zip(src):
        with zipfile.ZipFile(src) as z:
            for member in z.namelist():  # refuse members that would land outside the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise KDError(f"{src}: member '{member}' would leave the cache folder")
            z.extractall(tmp)
        return tmp
    if not Path(src).is_dir():
        raise KDError(f"no cache at {src}")
    return Path(src)


def _publish(local: Path, dst: str | Path) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    if is_url(dst):
        fs, root = _fs(str(dst))
        root = root.rstrip("/")
        if fs.exists(root):
            fs.rm(root, recursive=True)
        for path in files:
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    elif is_zip(dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(dst) + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # chunks are compressed already
            for path in files:
                z.write(path, path.relative_to(local).as_posix())
        tmp.replace(dst)
    else:
        dst = Path(dst)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(local, dst, ignore=shutil.ignore_patterns("*.lock"))


def list_root(root: str | Path) -> list[str]:
    """The entries directly under a cache root, local or remote."""
    if is_url(root):
        fs, path = _fs(str(root))
        protocol = str(root).split("://", 1)[0]
        return sorted(
            f"{protocol}://{p}" for p in fs.ls(path.rstrip("/"), detail=False) if not p.endswith(".lock")
        )
    root = Path(root)
    if not root.is_dir():
        raise KDError(f"no cache directory at {root}: run `kd teacher-logits` first or name another DIR")
    return sorted(str(p) for p in root.iterdir() if p.is_dir() or is_zip(p))


def read_through_path(url: str, local_root: Path) -> Path:
    """Where the local read-through copy of a remote cache lives."""
    return local_root / re.sub(r"[^A-Za-z0-9._=-]+", "_", url.split("://", 1)[1]).strip("_")
