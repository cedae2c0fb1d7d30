"""DistiLLM's skew KL and skew reverse KL (Ko et al., ICML 2024), the method added through the method
table: its loss against a hand-written reference, on rows and on token sequences, and a run of each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import Paths, resolve
from pipeline.distill.losses import skew_kl, skew_rkl
from pipeline.distill.methods import TABLE, soft_settings
from pipeline.runs.identity import default_run_name, used_settings
from tests.test_cli import kd


def reference(
    zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, T: float, alpha: float, s: float, reverse: bool
):
    """Row by row in float64: (1 - alpha) CE + alpha T^2 KL(a || s a + (1 - s) b), (a, b) = (p, q) or
    (q, p) for the reverse, p the teacher's and q the student's softmax at T (the authors' mixtures)."""
    total = 0.0
    for i in range(len(zs)):
        p = torch.softmax(zt[i].double() / T, 0).tolist()
        q = torch.softmax(zs[i].double() / T, 0).tolist()
        a, b = (q, p) if reverse else (p, q)
        kl = sum(x * math.log(x / (s * x + (1 - s) * w)) for x, w in zip(a, b, strict=True))
        ce = -math.log(torch.softmax(zs[i].double(), 0)[int(y[i])].item())
        total += (1 - alpha) * ce + alpha * T**2 * kl
    return total / len(zs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    ("T", "alpha", "s"), [(1.0, 1.0, 0.1), (2.0, 0.5, 0.1), (4.0, 0.9, 0.3), (1.0, 0.7, 0.0)]
)
def test_skew_divergences_match_the_authors_mixtures(reverse: bool, T: float, alpha: float, s: float) -> None:
    zs, zt, y = torch.randn(7, 6) * 2, torch.randn(7, 6) * 3, torch.randint(0, 6, (7,))
    loss = (skew_rkl if reverse else skew_kl)(zs, zt, y, temperature=T, alpha=alpha, skew=s)
    assert loss.item() == pytest.approx(reference(zs, zt, y, T, alpha, s, reverse), rel=1e-5)


def test_skew_zero_is_the_plain_divergence_and_tokens_are_rows() -> None:
    from pipeline.distill.losses import hinton_kd

    zs, zt, y = torch.randn(5, 8), torch.randn(5, 8), torch.randint(0, 8, (5,))
    plain = hinton_kd(zs, zt, y, temperature=2.0, alpha=0.6)
    assert skew_kl(zs, zt, y, temperature=2.0, alpha=0.6, skew=0.0).item() == pytest.approx(
        plain.item(), rel=1e-5
    )
    tokens, teacher = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    labels = torch.randint(0, 8, (2, 4))
    labels[1, 2:] = -100  # padding: never trained on
    real = labels != -100
    for fn in (skew_kl, skew_rkl):
        seq = fn(tokens, teacher, labels, temperature=2.0, alpha=0.5, skew=0.1)
        rows = fn(tokens[real], teacher[real], labels[real], temperature=2.0, alpha=0.5, skew=0.1)
        assert seq.item() == pytest.approx(rows.item(), rel=1e-6)


def test_the_records_drive_names_and_identity() -> None:
    for name in ("skew-kl", "skew-rkl"):
        assert TABLE[name].table == "skew" and TABLE[name].uses_temperature and TABLE[name].uses_alpha
        preset = resolve("tiny", {"distill.method": name, "distill.temperature": 2.0})
        assert soft_settings(preset.distill) == {"temperature": 2.0, "alpha": 0.9}
        assert default_run_name(preset) == f"tiny-{name}-T2-a0.9-s0"
        assert "distill.skew.skew" in used_settings(preset) and "distill.dkd.beta" not in used_settings(
            preset
        )
    kd_preset = resolve("tiny", {"distill.method": "kd"})
    assert "distill.skew.skew" not in used_settings(kd_preset)  # another method's setting: not kd's identity


@pytest.mark.slow
def test_kd_distill_trains_with_each_skew_method(tiny_data: Paths) -> None:
    for name in ("skew-kl", "skew-rkl"):
        result = kd(
            tiny_data,
            "distill",
            "--preset",
            "tiny",
            "--method",
            name,
            "--epochs",
            "2",
            "--set",
            "distill.skew.skew=0.2",
        )
        assert result.exit_code == 0, result.output
        (run,) = Path(tiny_data.runs).glob(f"tiny-{name}-T*-s0-*")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == name and summary["method_settings"] == {"skew": 0.2}
        assert summary["student_val_accuracy"] > 0.1
    bad = kd(
        tiny_data, "distill", "--preset", "tiny", "--method", "skew-kl", "--set", "distill.skew.skew=1.0"
    )
    assert bad.exit_code == 2 and "skew.skew must be in [0, 1)" in bad.stderr
