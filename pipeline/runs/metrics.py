"""What reports rank students by: test/validation accuracy for classifiers, perplexity for language models.

A run's summary.json names its metric by its keys (`student_val_accuracy` or `student_val_perplexity`);
`kd compare` and `kd sweep` aggregate, sort, plot and flag outlier seeds with the matching Metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# An outlier accuracy is at least this many points from its configuration's median: seed noise on the
# default preset reaches 2-3 points (README "Comparing methods"), a collapsed seed tens of points.
OUTLIER_POINTS = 5.0
# An outlier perplexity is at least this fraction of the median away: seeds of the lm preset differ by
# about 1%, a diverged one by a factor.
OUTLIER_FRACTION = 0.10


@dataclass(frozen=True)
class Metric:
    name: str  # the summary key's suffix: student_{val,test}_{name}
    header: str  # a column title's unit, after "val " or "test "
    scale: float  # shown value = scale x stored value (accuracy is stored in [0, 1], shown in %)
    higher_is_better: bool

    def shown(self, summary: Mapping[str, Any], split: str, who: str = "student") -> float:
        return self.scale * summary[f"{who}_{split}_{self.name}"]

    def margin(self, median: float) -> float:
        """How far from the median a seed must be, at least, to be an outlier."""
        return OUTLIER_FRACTION * median if self.name == "perplexity" else OUTLIER_POINTS

    def margin_text(self) -> str:
        return (
            f"{OUTLIER_FRACTION:.0%} of the median"
            if self.name == "perplexity"
            else f"{OUTLIER_POINTS:g} points"
        )

    def best_first(self, rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: r[key], reverse=self.higher_is_better)


ACCURACY = Metric("accuracy", "acc. (%)", 100.0, True)
PERPLEXITY = Metric("perplexity", "perplexity", 1.0, False)
METRICS = {m.name: m for m in (ACCURACY, PERPLEXITY)}


def metric_of(summary: Mapping[str, Any]) -> Metric:
    """The metric a run's summary reports: perplexity for a language model, else accuracy."""
    return PERPLEXITY if "student_val_perplexity" in summary else ACCURACY
