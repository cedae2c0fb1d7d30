"""Progress people can read anywhere: a tqdm bar on a terminal; with output redirected (tee, nohup, a
cluster job's log) plain lines on stderr with the same numbers, one per epoch or one every few seconds.

    progress = Progress(total=40, desc="kd", unit="epoch")
    progress.update(1, loss="0.512", val="71.2%")     # a bar step, or "kd: epoch 1/40 loss 0.512 val 71.2%"
    progress.close()

TQDM_DISABLE=1 (as the tests set it) silences both.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(
        self, *, total: int, desc: str, unit: str, every_s: float = 0.0, enabled: bool = True
    ) -> None:
        """every_s: plain lines at most this often (0: every update, for epochs)."""
        quiet = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            leave=False,
            dynamic_ncols=True,
            disable=True if quiet else None,
        )
        self.plain = not quiet and self.bar.disable  # no terminal: tqdm turned itself off
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, **numbers: str) -> None:
        self.done += n
        if not self.plain:
            if numbers:
                self.bar.set_postfix(numbers, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.every_s and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        if self.unit == "epoch":
            count = f"epoch {self.done}/{self.total}"
        else:
            rate = self.done / max(now - self.start, 1e-9)
            percent = 100 * self.done / max(self.total, 1)
            count = f"{self.done:,}/{self.total:,} {self.unit}s ({percent:.0f}%), {rate:,.0f} {self.unit}s/s"
        extra = "".join(f" {k} {v}" for k, v in numbers.items())
        print(f"{self.desc}: {count}{extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
