"""Where a cache's bytes live, below the store: local folders, zip files, `file://` URLs and fsspec URLs
(s3://, gs://, ...). Naming locations, opening them for zarr, and listing a cache root. Nothing here
knows what a cache holds (pipeline.store builds on this; pipeline.remote copies between locations).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import zarr

from pipeline.errors import KDError

ROOT_METADATA = "zarr.json"
TMP_MARK = ".kd-tmp-"  # `<name>.kd-tmp-<token>`: a copy being published (pipeline.remote)


def local_path(location: str | Path) -> str | Path:
    """file:// URLs become plain paths (one code path for every local folder); other values unchanged."""
    text = str(location)
    if text.startswith("file://"):
        parsed = urlparse(text)
        return Path(unquote(parsed.netloc + parsed.path)) if parsed.netloc else Path(unquote(parsed.path))
    return location


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def is_zip(location: str | Path) -> bool:
    return str(location).rstrip("/").endswith(".zip")


def zarr_store(location: str | Path, *, writable: bool = False) -> Any:
    """What zarr opens for a location: a URL string (fsspec), a ZipStore, or a local path."""
    location = local_path(location)
    if is_url(location):
        return str(location)
    if is_zip(location):
        if not Path(location).is_file():
            raise KDError(f"no zip file at {location}")
        try:
            with zipfile.ZipFile(location) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise KDError(f"{location} is not a readable zip file ({err})") from None
        return zarr.storage.ZipStore(str(location), mode="a" if writable else "r")
    return Path(location)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path on it (no trailing slash)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise KDError(f"cannot open {url}: {err} (install the fsspec filesystem for this protocol)") from None
    return fs, path.rstrip("/")


def exists(location: str | Path) -> bool:
    """Whether a cache (its group metadata) is at `location`."""
    location = local_path(location)
    if is_url(location):
        fs, path = filesystem(str(location))
        return bool(fs.exists(f"{path}/{ROOT_METADATA}"))
    return Path(location).exists()


def occupied(location: str | Path) -> bool:
    """Whether anything at all is at `location` (a cache, other files, a half-written copy)."""
    if is_url(location):
        fs, path = filesystem(str(location))
        return bool(fs.exists(path))
    return Path(location).exists() or Path(location).is_symlink()


def root_attributes(location: str | Path) -> dict[str, Any] | None:
    """The attributes of the Zarr group at `location` (a folder, URL or zip), or None if unreadable."""
    try:
        if is_url(location):
            fs, path = filesystem(str(location))
            metadata = fs.cat_file(f"{path}/{ROOT_METADATA}")
        elif is_zip(location):
            with zipfile.ZipFile(location) as z:
                metadata = z.read(ROOT_METADATA)
        else:
            metadata = (Path(location) / ROOT_METADATA).read_bytes()
        attrs = json.loads(metadata).get("attributes", {})
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def list_root(root: str | Path) -> list[str]:
    """The entries directly under a cache root, local or remote."""
    root = local_path(root)
    if is_url(root):
        fs, path = filesystem(str(root))
        protocol = str(root).split("://", 1)[0]
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:  # an empty prefix: object stores have no folders to be missing
            return []
        return sorted(f"{protocol}://{p}" for p in names if not p.endswith(".lock") and p.rstrip("/") != path)
    root = Path(root)
    if not root.is_dir():
        raise KDError(f"no cache directory at {root}: run `kd teacher-logits` first or name another DIR")
    return sorted(str(p) for p in root.iterdir() if (p.is_dir() or is_zip(p)) and TMP_MARK not in p.name)


def read_through_path(url: str, local_root: Path) -> Path:
    """Where the local read-through copy of a remote cache lives."""
    return local_root / re.sub(r"[^A-Za-z0-9._=-]+", "_", url.split("://", 1)[1]).strip("_")
