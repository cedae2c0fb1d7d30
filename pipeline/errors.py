"""The one exception type users see as a one-line error (the CLI prints it and exits non-zero)."""

from __future__ import annotations


class KDError(Exception):
    """A problem with the user's input or files: the message says what is wrong and what to do."""


class DivergedError(KDError):
    """Training produced a non-finite loss (NaN or Inf): the run stops rather than train on garbage."""

    def __init__(self, epoch: int, loss: float, where: str = "", settings: str = "") -> None:
        self.epoch, self.loss, self.where = epoch, loss, where
        used = f" with {settings}" if settings else ""
        super().__init__(
            f"training stopped at epoch {epoch}{where}: the loss is {loss} (not finite){used}; lower the "
            "learning rate or the temperature, or check the cache with `kd cache verify`"
        )
