"""The paper presets resolve to the papers' settings: each row below is written from the papers and the
authors' code (huawei-noah/Efficient-NLP `Annealing_KD/`), not from the presets, so a preset that drifts
from its paper fails here. README "Presets for the papers' setups" states the same table."""

from __future__ import annotations

import pytest

from pipeline.config import resolve
from pipeline.distill.phases import phases

VISION = ("cifar10", "cifar100")

# (preset, method) -> {dotted setting: the paper's value}
PAPERS: dict[tuple[str, str], dict[str, object]] = {
    **{
        (preset, "annealing"): {
            # annealing_kd_train.py: SGD(lr 0.1, momentum 0.9, wd 1e-4), batch 128, LR x0.1 at 50%/75% of each
            # phase, F.mse_loss (class mean), max_temperature 10, README command 200 + 200 epochs
            "distill.train.optimizer": "sgd",
            "distill.train.lr": 0.1,
            "distill.train.momentum": 0.9,
            "distill.train.nesterov": False,
            "distill.train.weight_decay": 1e-4,
            "distill.train.batch_size": 128,
            "distill.train.schedule": "step",
            "distill.train.epochs": 400,
            "distill.annealing.phase1_epochs": 200,
            "distill.annealing.phase2_lr": 0.0,  # phase 2 restarts at distill.train.lr, as theirs does
            "distill.annealing.tau_max": 10,
            "distill.annealing.mse": "mean",
        }
        for preset in VISION
    },
    **{
        (preset, "continuation"): {
            # Continuation-KD, vision: 200 epochs, T_max 20, lr 0.2, batch 32, psi(i) = i/150 up to 150
            "distill.train.optimizer": "sgd",
            "distill.train.momentum": 0.9,
            "distill.train.nesterov": False,
            "distill.train.epochs": 200,
            "distill.train.lr": 0.2,
            "distill.train.batch_size": 32,
            "distill.continuation.t_max": 20,
            "distill.continuation.anneal_epochs": 0,  # n = the 200 epochs: k = 10
            "distill.continuation.psi": "linear",
            "distill.continuation.psi_epochs": 150,
            "distill.continuation.psi_ramp_epochs": 150,
            "distill.continuation.mse": "mean",
            "distill.continuation.margin": 1.0,
        }
        for preset in VISION
    },
    ("glue-sst2", "annealing"): {
        # annealing_kd_glue.py + its README command: AdamW lr 2e-5, wd 0, linear decay, batch 32, max length
        # 128, max_temperature 7, 14 + 4 epochs, F.mse_loss
        "distill.train.optimizer": "adamw",
        "distill.train.lr": 2e-5,
        "distill.train.weight_decay": 0.0,
        "distill.train.schedule": "linear",
        "distill.train.batch_size": 32,
        "distill.train.epochs": 18,
        "distill.annealing.phase1_epochs": 14,
        "distill.annealing.tau_max": 7,
        "distill.annealing.mse": "mean",
        "dataset.options.max_length": 128,
    },
    ("glue-sst2", "continuation"): {
        # Continuation-KD, GLUE: T_max 10, lr 2e-5, batch 64, 30 epochs, psi(i) = i/40 for i <= 20, then 1
        "distill.train.optimizer": "adamw",
        "distill.train.lr": 2e-5,
        "distill.train.batch_size": 64,
        "distill.train.epochs": 30,
        "distill.continuation.t_max": 10,
        "distill.continuation.psi": "linear",
        "distill.continuation.psi_epochs": 20,
        "distill.continuation.psi_ramp_epochs": 40,
        "distill.continuation.mse": "mean",
        "distill.continuation.margin": 1.0,
    },
}


def setting(preset: object, dotted: str) -> object:
    value = preset
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(value, dict):
            return value[".".join(parts[i:])]
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("preset, method", sorted(PAPERS), ids=[f"{p}-{m}" for p, m in sorted(PAPERS)])
def test_paper_preset_resolves_to_the_papers_settings(preset: str, method: str) -> None:
    resolved = resolve(preset, {"distill.method": method})
    got = {key: setting(resolved, key) for key in PAPERS[preset, method]}
    assert got == PAPERS[preset, method]


def test_vision_annealing_runs_two_200_epoch_phases_each_with_its_own_step_schedule() -> None:
    phase1, phase2 = phases(resolve("cifar100", {"distill.method": "annealing"}).distill)
    assert (phase1.optim.epochs, phase2.optim.epochs) == (200, 200)
    assert (phase1.optim.lr, phase2.optim.lr) == (0.1, 0.1)
    # Phi per epoch: T = 10 for 20 epochs, then 9, ..., 1 for epochs 180-199 (Phi = 0.1, 0.2, ..., 1)
    phis = [phase1.settings(e)["phi"] for e in range(200)]
    assert phis == pytest.approx([level / 10 for level in range(1, 11) for _ in range(20)])
    assert [phase1.settings(e)["mse"] for e in (0, 199)] == ["mean", "mean"]


@pytest.mark.parametrize(
    "preset, psi",
    [
        ("glue-sst2", [i / 40 for i in range(21)] + [1.0] * 9),  # a ramp to 0.5, then a jump to 1
        ("cifar10", [i / 150 for i in range(151)] + [1.0] * 49),
    ],
)
def test_continuation_psi_and_phi_per_epoch_as_in_the_paper(preset: str, psi: list[float]) -> None:
    cfg = resolve(preset, {"distill.method": "continuation"}).distill
    (phase,) = phases(cfg)
    epochs, t_max = cfg.train.epochs, cfg.continuation.t_max
    assert [phase.settings(e)["psi"] for e in range(epochs)] == pytest.approx(psi)
    k = epochs // t_max  # the paper: T drops by one every floor(n / T_max) epochs, from T_max
    expected_phi = [1 - (max(1, t_max - e // k) - 1) / t_max for e in range(epochs)]
    assert [phase.settings(e)["phi"] for e in range(epochs)] == pytest.approx(expected_phi)
    assert phase.settings(epochs - 1)["phi"] == 1.0  # T reaches 1 within the run


def test_logit_standardization_recipe_is_expressible() -> None:
    from pipeline.distill.methods import settings_at

    cfg = resolve(
        "cifar100",
        {
            "distill.standardize": True,
            "distill.temperature": 2,
            "distill.ce_weight": 0.1,
            "distill.kd_weight": 9,
        },
    ).distill
    kwargs = settings_at(cfg, "kd", 0)
    assert (kwargs["ce_weight"], kwargs["kd_weight"], kwargs["temperature"], kwargs["standardize"]) == (
        0.1,
        9.0,
        2.0,
        True,
    )
    assert "alpha" not in kwargs
