"""PNG plots people would rather look at than read: a run's learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.runs.metrics import METRICS
from pipeline.training.loop import EpochRecord


def pyplot() -> Any:
    """matplotlib.pyplot, imported when a plot is drawn (~0.7 s: a command that fails first never pays),
    drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    history: Sequence[EpochRecord],
    path: Path,
    *,
    title: str,
    best_epoch: int,
    teacher_test: float | None,
    phase_starts: Sequence[tuple[int, str]] = (),  # (first epoch, name) of each training phase
) -> None:
    """Train loss (left) and train/val/test accuracy (right) per epoch, the selected epoch marked, and
    where a new training phase starts (Annealing-KD's CE phase: its loss is another quantity, so the
    jump there is not a divergence)."""
    epochs = [r.epoch for r in history]
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    starts = list(phase_starts) or [(epochs[0], "train")]
    for i, (first, name) in enumerate(starts):  # one line per phase: their losses are different quantities
        stop = starts[i + 1][0] if i + 1 < len(starts) else epochs[-1] + 1
        part = [r for r in history if first <= r.epoch < stop]
        ax_loss.plot([r.epoch for r in part], [r.train_loss for r in part], label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, [100 * r.train_accuracy for r in history], label="train", color="tab:gray")
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in history], label="val", color="tab:blue")
    if history[0].test_accuracy is not None:
        ax_acc.plot(epochs, [100 * (r.test_accuracy or 0) for r in history], label="test", color="tab:orange")
    if teacher_test is not None:
        ax_acc.axhline(100 * teacher_test, ls="--", color="tab:green", label="teacher test")
    ax_acc.axvline(best_epoch, ls=":", color="k", label=f"selected (epoch {best_epoch})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for epoch, _ in starts[1:]:
        for ax in (ax_loss, ax_acc):
            ax.axvline(epoch - 0.5, color="tab:purple", ls="--", lw=1)
    if len(starts) > 1:
        ax_loss.set_yscale("log")  # e.g. squared error, then cross-entropy: scales apart
        ax_loss.legend(title="phase (dashed: next starts)", fontsize=8, title_fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sequence_curves(
    history: Sequence[EpochRecord], path: Path, title: str, best_epoch: int, teacher: float | None
) -> None:
    """A language model's run: train loss (left) and validation perplexity (right, log scale) per
    epoch, the selected epoch and the teacher's test perplexity marked."""
    plt = pyplot()
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r.train_loss for r in history])
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_ppl.plot(epochs, [r.val_perplexity for r in history], label="val", color="tab:blue")
    if teacher is not None:
        ax_ppl.axhline(teacher, ls="--", color="tab:green", label="teacher test")
    ax_ppl.axvline(best_epoch, ls=":", color="k", label=f"selected (epoch {best_epoch})")
    ax_ppl.set(xlabel="epoch", ylabel="perplexity", title="validation perplexity", yscale="log")
    ax_ppl.legend(fontsize=8)
    for ax in (ax_loss, ax_ppl):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(
    rows: Sequence[dict[str, Any]], path: Path, *, title: str, teacher_test: float | None
) -> None:
    """Test accuracy (or a language model's perplexity) per configuration as a dot plot: every seed a dot
    (outlier seeds red), the mean a diamond with a +-1 std bar. Dots, not bars, so a zoomed axis cannot
    exaggerate a difference, and the axis says where it starts when that is not 0."""
    metric = METRICS[rows[0].get("metric", "accuracy")]
    teacher = None if teacher_test is None else metric.scale * teacher_test
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.9))
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows, strict=True):
        marked = set(row.get("test_outliers", []))
        normal = [v for i, v in enumerate(row["test"]) if i not in marked]
        ax.plot(normal, [y] * len(normal), "o", color="k", ms=3.5, alpha=0.7)
        if marked:
            ax.plot([row["test"][i] for i in marked], [y] * len(marked), "o", color="tab:red", ms=5)
        if row["seeds"] > 1:
            ax.errorbar(row["test_mean"], y, xerr=row["test_std"], fmt="none", ecolor="tab:blue", capsize=4)
        ax.plot(row["test_mean"], y, "D", color="tab:blue", ms=6)
    if teacher is not None:
        ax.axvline(teacher, ls="--", color="tab:green", label="teacher")
        ax.legend(loc="lower right", fontsize=8)
    low = min([min(r["test"]) for r in rows] + ([teacher] if teacher else []))
    high = max([max(r["test"]) for r in rows] + ([teacher] if teacher else []))
    if metric.name == "accuracy":
        start = max(0.0, 5 * ((low - 3) // 5))
        ax.set_xlim(start, min(100.0, high + 2))
    else:  # perplexity: no upper bound, lower is better
        start = max(1.0, 5 * ((0.95 * low) // 5))
        ax.set_xlim(start, 1.05 * high)
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.grid(axis="x", alpha=0.3)
    seeds = max(r["seeds"] for r in rows)
    what = "dots: each seed (red: outlier seed); diamond: mean" + (
        "; bar: ± 1 std over seeds" if seeds > 1 else ""
    )
    if metric.name == "accuracy":
        label = "test accuracy (%)" + (f", axis starts at {start:g}%, not 0" if start > 0 else "")
    else:
        label = "test perplexity (lower is better)"
    ax.set_xlabel(f"{label}\n{what}")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(combos: Sequence[dict[str, Any]], keys: Sequence[str], out: Path) -> list[Path]:
    """Validation and test accuracy (or perplexity) against the first numeric grid key, one line per
    method (and per value of the other keys), mean with the seeds' min-max as a band. Returns the files
    written."""
    metric = METRICS[combos[0].get("metric", "accuracy")] if combos else METRICS["accuracy"]
    numeric = [
        k
        for k in keys
        if any(k in c["combo"] for c in combos)
        and all(_is_number(c["combo"][k]) for c in combos if k in c["combo"])
    ]
    if not numeric:
        return []
    x_key = numeric[0]
    series: dict[str, list[dict[str, Any]]] = {}
    flat: list[dict[str, Any]] = []  # combinations whose method ignores the x axis: a level, not a line
    for c in combos:
        if x_key not in c["combo"]:
            flat.append(c)
            continue
        rest = ", ".join(
            f"{k.split('.')[-1]}={c['combo'][k]}"
            for k in keys
            if k != x_key and k != "distill.method" and k in c["combo"]
        )
        series.setdefault(c["method"] + (f" ({rest})" if rest else ""), []).append(c)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for name, points in series.items():
            points = sorted(points, key=lambda c: float(c["combo"][x_key]))
            xs = [float(c["combo"][x_key]) for c in points]
            ax.plot(xs, [c[f"{split}_mean"] for c in points], marker="o", label=name, alpha=0.85)
            ax.fill_between(xs, [min(c[split]) for c in points], [max(c[split]) for c in points], alpha=0.15)
        for c in flat:
            ax.axhline(c[f"{split}_mean"], ls="--", lw=1, color="tab:gray")
            ax.annotate(
                f"{c['label']} (no {x_key.split('.')[-1]})",
                (0.01, c[f"{split}_mean"]),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                va="bottom",
                color="tab:gray",
            )
        ax.set(xlabel=x_key.split(".")[-1], title=f"{split} {metric.name} (mean, band: seed min-max)")
        if x_key.endswith("temperature") or x_key.endswith("lr"):
            ax.set_xscale("log", base=2 if x_key.endswith("temperature") else 10)
            values = sorted({float(c["combo"][x_key]) for cs in series.values() for c in cs})
            ax.set_xticks(values, [f"{v:g}" for v in values])  # 1, 2, 4, 8 rather than 2^0 ... 2^3
            ax.minorticks_off()
    axes[0].set_ylabel("accuracy (%)" if metric.name == "accuracy" else "perplexity (lower is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{metric.name}_vs_{x_key.split('.')[-1]}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)
