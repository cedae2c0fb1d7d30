"""PNG plots people would rather look at than read: a run's learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.train import EpochRecord  # noqa: E402


def plot_curves(
    history: Sequence[EpochRecord], path: Path, *, title: str, best_epoch: int, teacher_test: float | None
) -> None:
    """Train loss (left) and train/val/test accuracy (right) per epoch, the selected epoch marked."""
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r.train_loss for r in history], color="tab:gray")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, [100 * r.train_accuracy for r in history], label="train", color="tab:gray")
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in history], label="val", color="tab:blue")
    if history[0].test_accuracy is not None:
        ax_acc.plot(epochs, [100 * (r.test_accuracy or 0) for r in history], label="test", color="tab:orange")
    if teacher_test is not None:
        ax_acc.axhline(100 * teacher_test, ls="--", color="tab:green", label="teacher test")
    ax_acc.axvline(best_epoch, ls=":", color="k", label=f"selected (epoch {best_epoch})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(
    rows: Sequence[dict[str, Any]], path: Path, *, title: str, teacher_test: float | None
) -> None:
    """Mean test accuracy per configuration with a std bar and every seed as a dot."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows, strict=True):
        ax.barh(y, row["test_mean"], xerr=row["test_std"], color="tab:blue", alpha=0.6, capsize=3)
        ax.plot(row["test"], [y] * len(row["test"]), "o", color="k", ms=3)
    if teacher_test is not None:
        ax.axvline(100 * teacher_test, ls="--", color="tab:green", label="teacher")
        ax.legend(loc="lower right", fontsize=8)
    low = min(min(r["test"]) for r in rows)
    high = max([max(r["test"]) for r in rows] + ([100 * teacher_test] if teacher_test else []))
    ax.set_xlim(max(0.0, low - 5), min(100.0, high + 2))
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.set(xlabel="test accuracy (%)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
