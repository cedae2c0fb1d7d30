"""Things kd derives on this machine and keeps between commands, in the user's cache folder
(~/.cache/kd, or $XDG_CACHE_HOME/kd): generated datasets and the default text's parse. Each file is
named by a digest of everything it is derived from, written whole and renamed (a reader never sees
half a file), and simply derived again when missing, unreadable or from other inputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kd"


def path_for(prefix: str, inputs: Any, suffix: str) -> Path:
    """Where the thing derived from `inputs` (anything JSON can write) is kept."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    return folder() / f"{prefix}-{digest}{suffix}"


def keep(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)` then a rename; a read-only home keeps nothing (no error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        tmp.replace(path)
    except OSError:
        pass
