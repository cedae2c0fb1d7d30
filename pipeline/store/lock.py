"""One writer per cache: `<cache>.lock`, held with an OS file lock (flock) for as long as the writer lives.

The kernel releases the lock when its process dies (kill -9 included), so a lock file left behind is
simply taken by the next writer: there is no read-check-delete race in which two writers could both
win. The file also names its holder (pid, host, start time) for the messages other processes print.
On network filesystems flock maps to the server's byte-range locks (NFSv4, Lustre with `flock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import KDError
from pipeline.store.manifest import now_iso

LOCK_SUFFIX = ".lock"

# The lock fds this process holds. A forked child (a DataLoader worker decoding inputs) would share the
# lock's open file and so keep it held after the writer is killed, until it notices its parent is
# gone: children close their copies at once.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def lock_path(path: Path) -> Path:
    return path if path.name.endswith(LOCK_SUFFIX) else path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold `<path>.lock` for the duration; a live holder stops this writer with a one-line KDError."""
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)  # the umask decides who else may read it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise KDError(
                f"cache {path} is being written by pid {owner.get('pid')} on {owner.get('host')} since "
                f"{owner.get('started')}: wait for it to finish"
            ) from None
        try:  # the file we locked must still be the one at the path (a finishing writer unlinks it)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held.add(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: the next writer makes a new file
        _held.discard(fd)
        os.close(fd)


def holder(path: Path) -> dict[str, Any] | None:
    """Who holds the lock of `path` (a cache or its lock file) now: the owner record, or None when no
    live process does (no lock file, or one left by a writer that is gone)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(fd) or {"pid": "?", "host": "?", "started": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _owner(fd: int) -> dict[str, Any]:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
