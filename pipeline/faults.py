"""Testing hooks that kill the process (SIGKILL, as kill -9) at exact points, so tests can interrupt a
real process where a crash would. Never set outside tests; each reads its variable when its point is
reached, not at import:

    KD_FAULT_AFTER_SHARDS=N    once N shards of a dump are done (pipeline.store.dense)
    KD_FAULT_AFTER_UPLOADS=N   once N files of a copy are written: objects uploaded, files copied or
                               zipped (pipeline.remote)
"""

from __future__ import annotations

import os
import signal


class FaultPoint:
    """Counts its calls; the call that reaches the number in `variable` kills this process."""

    def __init__(self, variable: str) -> None:
        self.variable, self.count = variable, 0

    def __call__(self) -> None:
        limit = os.environ.get(self.variable)
        if limit:
            self.count += 1
            if self.count >= int(limit):
                os.kill(os.getpid(), signal.SIGKILL)
