from __future__ import annotations

import math

import pytest

from pipeline.config import ContinuationConfig, DistillConfig, OptimConfig
from pipeline.schedules import (
    alpha_at,
    annealing_temperature,
    continuation_temperature,
    dkd_warmup,
    interpolate,
    lr_at,
    phi,
    psi_at,
    temperature_at,
)


def test_annealing_temperature_counts_down_every_epochs_over_tau() -> None:
    # 30 phase-1 epochs, tau_max 10: T = 10 for epochs 0-2, 9 for 3-5, ..., 1 for 27-29
    values = [annealing_temperature(e, 30, 10) for e in range(30)]
    assert values[:3] == [10, 10, 10] and values[3:6] == [9, 9, 9] and values[27:] == [1, 1, 1]
    assert values == sorted(values, reverse=True) and set(values) == set(range(1, 11))


def test_phi_grows_from_one_over_tau_max_to_one() -> None:
    assert phi(10, 10) == pytest.approx(0.1)
    assert phi(1, 10) == 1.0
    assert phi(5, 20) == pytest.approx(0.8)


def test_continuation_temperature_paper_vision_setting() -> None:
    # n = 200 epochs, T_max = 20: k = 10, T drops by one every 10 epochs and is clamped at 1
    assert [continuation_temperature(e, 200, 20) for e in (0, 9, 10, 19, 20, 189, 190, 199, 250)] == [
        20,
        20,
        19,
        19,
        18,
        2,
        1,
        1,
        1,
    ]
    # n < T_max: k clamps at 1, T drops every epoch
    assert [continuation_temperature(e, 3, 10) for e in (0, 5, 12)] == [10, 5, 1]


def test_psi_ramp_and_step() -> None:
    ramp = ContinuationConfig(psi="linear", psi_epochs=150)
    assert [psi_at(e, ramp) for e in (0, 75, 150, 199)] == [0.0, 0.5, 1.0, 1.0]
    step = ContinuationConfig(psi="step", psi_epochs=20)
    assert [psi_at(e, step) for e in (0, 19, 20, 30)] == [0.0, 0.0, 1.0, 1.0]


def test_interpolate_kinds() -> None:
    assert interpolate("constant", 5, 10, 4.0, 1.0) == 4.0
    assert [interpolate("linear", e, 5, 4.0, 0.0) for e in range(5)] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert interpolate("cosine", 0, 11, 4.0, 1.0) == 4.0
    assert interpolate("cosine", 5, 11, 4.0, 1.0) == pytest.approx(2.5)
    assert interpolate("cosine", 10, 11, 4.0, 1.0) == pytest.approx(1.0)
    assert [interpolate("step", e, 8, 4.0, 1.0, steps=4) for e in range(8)] == [4, 4, 3, 3, 2, 2, 1, 1]


def test_temperature_and_alpha_schedules_from_config() -> None:
    cfg = DistillConfig(
        temperature=8.0,
        temperature_schedule="linear",
        temperature_end=2.0,
        alpha=0.5,
        alpha_schedule="linear",
        alpha_end=1.0,
        train=OptimConfig(epochs=4),
    )
    assert [temperature_at(e, cfg) for e in range(4)] == [8.0, 6.0, 4.0, 2.0]
    assert [alpha_at(e, cfg) for e in range(4)] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])
    assert temperature_at(3, DistillConfig(temperature=3.0)) == 3.0


def test_dkd_warmup_and_lr() -> None:
    assert [dkd_warmup(e, 20) for e in (0, 9, 19, 50)] == [0.05, 0.5, 1.0, 1.0]
    assert dkd_warmup(0, 0) == 1.0
    cfg = OptimConfig(epochs=10, lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(5, cfg) == pytest.approx(0.05)
    assert lr_at(9, cfg) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(7, OptimConfig(epochs=10, lr=0.1, schedule="constant")) == 0.1


def test_step_schedule_of_the_papers() -> None:
    cfg = OptimConfig(epochs=200, lr=0.1, schedule="step")
    assert [lr_at(e, cfg) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_crop_flip_keeps_shapes_and_content() -> None:
    import torch

    from pipeline.augment import augment, crop_flip

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = crop_flip(x, padding=0)  # no room to move: each image is itself or its mirror
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    moved = crop_flip(x, padding=2)
    assert moved.shape == x.shape
    assert set(moved.unique().tolist()) <= set(x.unique().tolist()) | {
        0.0
    }  # crops of the image or zero padding
    assert torch.equal(augment(x, "none"), x)
