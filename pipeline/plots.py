"""PNG plots people would rather look at than read: a run's learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.train import EpochRecord  # noqa: E402


def plot_curves(
    history: Sequence[EpochRecord], path: Path, *, title: str, teacher_test: float | None
) -> None:
    """Train loss (left) and train/val/test accuracy (right) per epoch, best-validation epoch marked."""
    epochs = [r.epoch for r in history]
    best = max(history, key=lambda r: r.val_accuracy)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r.train_loss for r in history], color="tab:gray")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, [100 * r.train_accuracy for r in history], label="train", color="tab:gray")
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in history], label="val", color="tab:blue")
    if history[0].test_accuracy is not None:
        ax_acc.plot(epochs, [100 * (r.test_accuracy or 0) for r in history], label="test", color="tab:orange")
    if teacher_test is not None:
        ax_acc.axhline(100 * teacher_test, ls="--", color="tab:green", label="teacher test")
    ax_acc.axvline(best.epoch, ls=":", color="k", label=f"best val (epoch {best.epoch})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
