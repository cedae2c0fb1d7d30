"""Compare and sweep reports show every seed and mark a collapsed one instead of averaging it away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.runs.metrics import PERPLEXITY
from pipeline.runs.reports import aggregate, markdown, mean_std, outliers


def result(label: str, seed: int, test: float, val: float, method: str = "annealing") -> dict:
    return {
        "label": label,
        "method": method,
        "seed": seed,
        "student_test_accuracy": test,
        "student_val_accuracy": val,
        "wall_time_s": 1.0,
    }


@pytest.mark.parametrize(
    "values, expected",
    [
        ([95.0, 95.3, 68.2], [2]),  # the 64-8-10 student's collapsed seed
        ([59.0, 94.8, 95.1, 95.4], [0]),
        ([73.0, 71.0, 69.0], []),  # ordinary seed noise
        ([72.0, 72.0, 76.5], []),  # MAD 0: still needs OUTLIER_POINTS of distance
        ([69.4, 71.7, 72.0], []),  # kd T=2 on mnist1d: 2.3 points off, noise
        ([95.0, 60.0], []),  # two seeds cannot say which one is off
    ],
)
def test_outlier_seeds(values: list[float], expected: list[int]) -> None:
    assert outliers(values) == expected


def test_report_lists_every_seed_and_names_the_outlier(tmp_path: Path) -> None:
    results = [
        result("annealing", 0, 0.950, 0.951),
        result("annealing", 1, 0.953, 0.949),
        result("annealing", 2, 0.682, 0.690),
        result("kd", 0, 0.940, 0.93, method="kd"),
        result("kd", 1, 0.945, 0.94, method="kd"),
        result("kd", 2, 0.935, 0.95, method="kd"),
    ]
    rows = aggregate(results)
    text = markdown(rows, 0.97, "digits", 3, "digits")
    assert "s0 95.00, s1 95.30, **s2 68.20 (outlier)**" in text
    assert "**Outlier seeds**" in text and "annealing seed 2 (test 68.20)" in text
    assert "annealing seed 2 (val 69.00)" in text
    assert "s0 94.00, s1 94.50, s2 93.50 |" in text  # kd: nothing marked
    assert "kd seed" not in text
    sets = {"dataset.workers": 2, "distill.train.epochs": 5}  # the report's command repeats them
    again = markdown(rows, 0.97, "digits", 3, "digits.toml", sets)
    command = "kd compare --preset digits.toml --seeds 3 --set dataset.workers=2 --set distill.train.epochs=5"
    assert f"`{command}`" in again


def test_one_seed_has_no_zero_std() -> None:
    (row,) = aggregate([result("kd", 0, 0.7, 0.71, method="kd")])
    assert mean_std(row, "test") == "70.00"
    two = aggregate([result("kd", 0, 0.7, 0.71, method="kd"), result("kd", 1, 0.72, 0.7, method="kd")])[0]
    assert mean_std(two, "test") == "71.00 ± 1.41"


def test_continuation_without_margin_is_labelled_the_ablation() -> None:
    from pipeline.config import resolve
    from pipeline.distill.methods import method_label

    assert method_label(resolve("tiny", {"distill.method": "continuation"}).distill) == "continuation"
    ablation = resolve("tiny", {"distill.method": "continuation", "distill.continuation.margin": 0})
    assert method_label(ablation.distill) == "continuation (no-margin ablation, m=0)"


def test_run_names_show_only_what_the_method_uses() -> None:
    from pipeline.config import resolve
    from pipeline.runs.identity import default_run_name

    def name(**overrides: object) -> str:
        return default_run_name(resolve("tiny", {f"distill.{k}": v for k, v in overrides.items()}))

    assert name(method="kd") == "tiny-kd-T4-a0.9-s0"
    assert name(method="annealing") == "tiny-annealing-s0"  # no T, no alpha: it uses neither
    assert name(method="ce", seed=2) == "tiny-ce-s2"
    assert name(method="dkd", temperature=2) == "tiny-dkd-T2-s0"
    assert name(method="kd", temperature=2, ce_weight=0.1, kd_weight=9, standardize=True) == (
        "tiny-kd-T2-ce0.1-kd9-zscore-s0"
    )


def test_settings_a_method_ignores_do_not_make_another_run(tmp_path: Path) -> None:
    from pipeline.config import changed_settings, resolve
    from pipeline.runs.identity import check_run_folder, default_run_name, used_settings

    plain = resolve("tiny", {"distill.method": "annealing"})
    hot = resolve("tiny", {"distill.method": "annealing", "distill.temperature": 3, "distill.alpha": 0.5})
    assert used_settings(plain) == used_settings(hot)
    assert default_run_name(hot, changed_settings(hot, "tiny")) == "tiny-annealing-s0"
    folder = tmp_path / "tiny-annealing-s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"preset": plain.to_dict()}))
    check_run_folder(folder, hot)  # the same run: no refusal
    other = resolve("tiny", {"distill.method": "annealing", "distill.annealing.tau_max": 2})
    assert used_settings(other) != used_settings(plain)
    kd = resolve("tiny", {"distill.temperature": 3})
    assert used_settings(kd)[
        "distill.temperature"
    ] == 3.0 and "distill.annealing.tau_max" not in used_settings(kd)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([98.7, 99.5, 160.0], [2]),  # a diverged seed
        ([98.7, 99.5, 107.0], []),  # within 10% of the median: noise at this scale
        ([108.9, 107.8, 109.9], []),
    ],
)
def test_perplexity_outliers_are_relative(values: list[float], expected: list[int]) -> None:
    assert outliers(values, PERPLEXITY) == expected


def test_language_model_runs_are_reported_in_perplexity_lower_first() -> None:
    def lm(label: str, seed: int, test: float, val: float) -> dict:
        return {
            "label": label,
            "method": "kd",
            "method_label": f"kd, {label}",
            "seed": seed,
            "student_test_perplexity": test,
            "student_val_perplexity": val,
            "wall_time_s": 1.0,
        }

    rows = aggregate([lm("topk", 0, 108.6, 110.0), lm("tail", 0, 98.7, 100.5), lm("tail", 1, 99.1, 100.9)])
    assert [r["test_mean"] for r in rows] == [108.6, pytest.approx(98.9)]  # perplexity as is, not x 100
    text = markdown(rows, 131.0, "lm", 2, "lm")
    assert "| tail | kd, tail | 98.90 ± 0.28 | 100.70 ± 0.28 | s0 98.70, s1 99.10 |" in text
    assert "| teacher | | 131.00 |" in text and "(lower is better)" in text
    assert [r["label"] for r in PERPLEXITY.best_first(rows, "val_mean")] == ["tail", "topk"]
