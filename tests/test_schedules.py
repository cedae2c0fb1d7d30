from __future__ import annotations

import math

import pytest

from pipeline.config import ContinuationConfig, DistillConfig, OptimConfig
from pipeline.distill.schedules import (
    alpha_at,
    dkd_warmup,
    interpolate,
    lr_at,
    phi,
    psi_at,
    step_temperature,
    temperature_at,
)


def authors_annealing_phi(epochs: int, tau_max: int) -> list[float]:
    """Phi per epoch as the Annealing-KD authors' code computes it (Efficient-NLP, Annealing_KD/
    computer_vision_tasks/annealing_kd_train.py): T = 1, `if epoch % int(epochs / max_temperature) == 0 and
    epoch > 0: T += 1`, target `teacher * T / max_temperature`."""
    out, t = [], 1
    for epoch in range(epochs):
        if epoch % int(epochs / tau_max) == 0 and epoch > 0:
            t += 1
        out.append(t / tau_max)
    return out


def our_phi(epochs: int, tau_max: int) -> list[float]:
    return [phi(step_temperature(e, epochs, tau_max), tau_max) for e in range(epochs)]


def test_step_temperature_counts_down_every_k_epochs() -> None:
    # 30 epochs, tau_max 10: k = 3, T = 10 for epochs 0-2, 9 for 3-5, ..., 1 for 27-29
    values = [step_temperature(e, 30, 10) for e in range(30)]
    assert values == [t for t in range(10, 0, -1) for _ in range(3)]


def test_phi_grows_from_one_over_tau_max_to_one() -> None:
    assert phi(10, 10) == pytest.approx(0.1)
    assert phi(1, 10) == 1.0
    assert phi(5, 20) == pytest.approx(0.8)


@pytest.mark.parametrize("epochs, tau_max", [(30, 10), (200, 10), (14, 7), (200, 20), (6, 3), (5, 5)])
def test_phi_equals_the_authors_code_when_epochs_divide(epochs: int, tau_max: int) -> None:
    assert our_phi(epochs, tau_max) == pytest.approx(authors_annealing_phi(epochs, tau_max))


def test_non_divisible_epochs_by_hand() -> None:
    # n = 22, tau_max = 5: k = 4. Ours: T = 5 (0-3), 4 (4-7), 3 (8-11), 2 (12-15), 1 for the last 6
    # epochs. The authors' code steps at the same epochs but keeps going: T_theirs = 6 at epochs 20-21,
    # Phi = 1.2 (a target larger than the teacher's logits).
    ours = [0.2] * 4 + [0.4] * 4 + [0.6] * 4 + [0.8] * 4 + [1.0] * 6
    theirs = [0.2] * 4 + [0.4] * 4 + [0.6] * 4 + [0.8] * 4 + [1.0] * 4 + [1.2] * 2
    assert our_phi(22, 5) == pytest.approx(ours)
    assert authors_annealing_phi(22, 5) == pytest.approx(theirs)
    # n = 7, tau_max = 2: k = 3: T = 2, 2, 2, 1, 1, 1, 1 (theirs: 1/2, 1/2, 1/2, 1, 1, 1, 3/2)
    assert our_phi(7, 2) == pytest.approx([0.5] * 3 + [1.0] * 4)
    assert authors_annealing_phi(7, 2) == pytest.approx([0.5] * 3 + [1.0] * 3 + [1.5])
    # n = 6, tau_max = 4 (k = 1): T = 4, 3, 2, 1, 1, 1
    assert [step_temperature(e, 6, 4) for e in range(6)] == [4, 3, 2, 1, 1, 1]
    # the glue-sst2 preset before the paper's budget: n = 18, T_max = 10, k = 1: T = 1 from epoch 9 on
    assert [step_temperature(e, 18, 10) for e in range(18)] == list(range(10, 0, -1)) + [1] * 8


@pytest.mark.parametrize("epochs, tau_max", [(22, 5), (7, 2), (13, 4), (31, 10), (199, 20), (17, 16)])
def test_ours_is_the_authors_code_clamped_at_phi_one(epochs: int, tau_max: int) -> None:
    assert our_phi(epochs, tau_max) == pytest.approx(
        [min(p, 1.0) for p in authors_annealing_phi(epochs, tau_max)]
    )


def test_continuation_temperature_paper_settings() -> None:
    # vision: n = 200 epochs, T_max = 20: k = 10, T drops by one every 10 epochs and is clamped at 1
    assert [step_temperature(e, 200, 20) for e in (0, 9, 10, 19, 20, 189, 190, 199, 250)] == [
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
    # GLUE: n = 30, T_max = 10: k = 3, T = 1 from epoch 27
    assert [step_temperature(e, 30, 10) for e in (0, 2, 3, 26, 27, 29)] == [10, 10, 9, 2, 1, 1]


def test_psi_forms_of_the_paper() -> None:
    # vision: psi(i) = i / 150 for i <= 150, then 1
    vision = ContinuationConfig(psi="linear", psi_epochs=150)
    assert [psi_at(e, vision) for e in (0, 75, 150, 151, 199)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    # GLUE: psi(i) = i / 40 for i <= 20 (up to 0.5), then 1
    glue = ContinuationConfig(psi="linear", psi_epochs=20, psi_ramp_epochs=40)
    assert [psi_at(e, glue) for e in (0, 10, 19, 20, 21, 29)] == [0.0, 0.25, 0.475, 0.5, 1.0, 1.0]
    step = ContinuationConfig(psi="step", psi_epochs=20)
    assert [psi_at(e, step) for e in (0, 19, 20, 30)] == [0.0, 0.0, 1.0, 1.0]


def test_linear_lr_decays_to_zero_per_epoch() -> None:
    cfg = OptimConfig(epochs=4, lr=2e-5, schedule="linear")
    assert [lr_at(e, cfg) for e in range(4)] == pytest.approx([2e-5, 1.5e-5, 1e-5, 0.5e-5])


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

    from pipeline.data.augment import augment, crop_flip

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


@pytest.mark.parametrize("n, tau", [(20, 10), (22, 5), (7, 2), (13, 4), (31, 10), (5, 5)])
def test_continuation_loss_equals_annealing_loss_every_epoch(n: int, tau: int) -> None:
    """README "Continuation ⊃ Annealing": margin 0, psi a step at epoch n, T_max = tau_max, anneal_epochs =
    phase1_epochs = n and the same squared-error reduction give, at every epoch, Annealing-KD's loss
    (phase 1 for epochs < n, then phase 2's CE): the same function of (z_s, z_t, y), bit for bit."""
    import torch

    from pipeline.config import AnnealingConfig
    from pipeline.distill.phases import phases

    train = OptimConfig(epochs=n + 3)
    annealing = phases(
        DistillConfig(
            method="annealing", train=train, annealing=AnnealingConfig(tau_max=tau, phase1_epochs=n)
        )
    )
    (continuation,) = phases(
        DistillConfig(
            method="continuation",
            train=train,
            continuation=ContinuationConfig(t_max=tau, anneal_epochs=n, psi="step", psi_epochs=n, margin=0.0),
        )
    )
    gen = torch.Generator().manual_seed(n * 100 + tau)
    zs, zt = torch.randn(16, 10, generator=gen), 3 * torch.randn(16, 10, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    for epoch in range(n + 3):
        reference = annealing[0].loss_at(epoch) if epoch < n else annealing[1].loss_at(epoch - n)
        assert torch.equal(continuation.loss_at(epoch)(zs, zt, y), reference(zs, zt, y)), epoch
