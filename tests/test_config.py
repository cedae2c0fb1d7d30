from __future__ import annotations

import pytest

from pipeline.config import load_preset, preset_names, resolve, with_overrides
from pipeline.distill.losses import LOSSES
from pipeline.errors import KDError


@pytest.mark.parametrize("name", preset_names())
def test_presets_load(name: str) -> None:
    preset = load_preset(name)
    assert preset.name == name
    assert preset.distill.method in LOSSES
    assert preset.cache.chunk_rows_for(10) >= 1


def test_overrides_are_coerced_and_checked() -> None:
    preset = with_overrides(
        load_preset("tiny"),
        {"distill.temperature": "2.5", "distill.train.epochs": "3", "cache.dtype": "bfloat16"},
    )
    assert preset.distill.temperature == 2.5 and preset.distill.train.epochs == 3
    assert preset.cache.dtype == "bfloat16"
    assert with_overrides(preset, {"student.options": '{"hidden": [8, 8]}'}).student.options == {
        "hidden": [8, 8]
    }
    assert with_overrides(preset, {"student.options.hidden": "[32]"}).student.options == {"hidden": [32]}
    with pytest.raises(KDError, match="must be a table"):
        with_overrides(preset, {"student.options": "8"})
    with pytest.raises(KDError, match="expects int"):
        with_overrides(preset, {"distill.train.epochs": "three"})
    with pytest.raises(KDError, match="unknown setting 'distill.temprature': did you mean 'temperature'"):
        with_overrides(preset, {"distill.temprature": "2"})
    with pytest.raises(KDError, match="unknown setting 'distill.xyz': 'xyz' is not one of method,"):
        with_overrides(preset, {"distill.xyz": "2"})  # nothing close: no suggestion


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("distill.temperature", "-1", "temperature must be positive"),
        ("distill.alpha", "1.5", "alpha must be in \\[0, 1\\]"),
        ("distill.method", "magic", "unknown method 'magic'"),
        ("distill.label_smoothing", "1", "label_smoothing must be in"),
        ("cache.dtype", "int8", "unknown cache dtype"),
        ("distill.train.lr", "0", "lr must be positive"),
    ],
)
def test_bad_values_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(KDError, match=message):
        with_overrides(load_preset("tiny"), {key: value})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # the authors assert phase-1 epochs >= tau_max: T could not reach 1 (Phi would stop at 0.7)
        (
            {
                "distill.method": "annealing",
                "distill.annealing.phase1_epochs": 3,
                "distill.annealing.tau_max": 10,
            },
            "annealing.phase1_epochs (3) must be at least annealing.tau_max (10)",
        ),
        (
            {"distill.method": "continuation", "distill.train.epochs": 3},
            "continuation annealing epochs (3) must be at least continuation.t_max (4)",
        ),
        (
            {"distill.method": "continuation", "distill.continuation.anneal_epochs": 2},
            "continuation annealing epochs (2) must be at least continuation.t_max (4)",
        ),
        (
            {"distill.method": "continuation", "distill.continuation.psi_ramp_epochs": 5},
            "continuation.psi_ramp_epochs (5) must be 0 or at least psi_epochs (12)",
        ),
        (
            {"distill.method": "continuation", "distill.continuation.anneal_epochs": 30},
            "continuation.anneal_epochs (30) must be at most the epochs (20)",
        ),
        (
            {"distill.method": "continuation", "distill.continuation.psi_epochs": 20},
            "continuation.psi_epochs (20) must be smaller than the epochs (20): psi would never reach 1",
        ),
        (
            {"distill.method": "dkd", "distill.dkd.warmup_epochs": 21},
            "dkd.warmup_epochs (21) must be at most the epochs (20)",
        ),
        ({"distill.ce_weight": 0.1}, "set both distill.ce_weight and distill.kd_weight"),
        (
            {"distill.ce_weight": 0.1, "distill.kd_weight": 9, "distill.alpha_schedule": "linear"},
            "alpha_schedule cannot be used with distill.ce_weight/kd_weight",
        ),
        ({"distill.kd_weight": -1, "distill.ce_weight": 1}, "distill.kd_weight must be >= 0"),
    ],
)
def test_settings_that_cannot_go_together_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(KDError) as err:
        resolve("tiny", overrides)
    assert message in str(err.value)


def test_the_order_of_overrides_does_not_matter() -> None:
    """Checks across settings run on the finished configuration, not after each --set."""
    settings = {
        "distill.method": "annealing",
        "distill.train.epochs": 5,
        "distill.annealing.phase1_epochs": 4,
    }
    forward = resolve("tiny", settings)
    backward = resolve("tiny", dict(reversed(list(settings.items()))))
    assert forward == backward and forward.distill.train.epochs == 5
    # the guards still apply to methods that use them only: a short kd run needs no tau_max epochs
    assert resolve("tiny", {"distill.method": "kd", "distill.train.epochs": 1}).distill.train.epochs == 1


def test_automatic_chunk_rows_target_a_mebibyte() -> None:
    from pipeline.config import CacheConfig

    assert CacheConfig(chunk_rows=0).chunk_rows_for(100) == 4096  # 4096 x 100 x 2 B = 800 KiB
    assert CacheConfig(chunk_rows=0, dtype="float32").chunk_rows_for(1000) == 256
    assert CacheConfig(chunk_rows=0).chunk_rows_for(100_000) == 256  # floor for huge vocabularies
    assert CacheConfig(chunk_rows=64).chunk_rows_for(100) == 64


def test_unknown_preset() -> None:
    with pytest.raises(KDError, match="preset file nope.toml does not exist"):
        load_preset("nope.toml")
    with pytest.raises(KDError, match="unknown preset 'nope': choose one of .*mnist1d"):
        load_preset("nope")


def test_preset_from_path_rejects_unknown_fields(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[distill]\nmethod = "kd"\ntemprature = 3\n')
    with pytest.raises(KDError, match="distill.temprature"):
        load_preset(str(path))
    path.write_text('[distill]\nmethod = "ce"\n')
    assert load_preset(str(path)).name == "mine"


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("mnist1d", {}),
        (
            "mnist1d",
            {"distill.method": "annealing", "distill.train.lr": "0.02", "student.options.hidden": "[64]"},
        ),
        ("cifar100", {"distill.method": "continuation"}),
        ("glue-sst2", {}),
        ("tiny", {"distill.ce_weight": "0.1", "distill.kd_weight": "9", "distill.standardize": "true"}),
    ],
)
def test_config_show_round_trips(preset: str, overrides: dict, tmp_path) -> None:  # noqa: ANN001
    """`kd config show` output, saved as a preset, resolves to the same settings (method defaults and
    command line included); every setting is listed with its origin."""
    from pipeline.config import flat_settings
    from pipeline.preset_toml import origins, to_toml

    resolved = resolve(preset, overrides)
    text = to_toml(resolved, origins(preset, overrides))
    (tmp_path / "shown.toml").write_text(text)
    again = resolve(str(tmp_path / "shown.toml"))
    assert flat_settings(again) == flat_settings(resolved)
    assert again.compare == resolved.compare and again.sweep == resolved.sweep
    where = origins(preset, overrides)
    assert set(where) == set(flat_settings(resolved))  # every setting has an origin
    for key in overrides:
        assert where[key if key in where else key.rsplit(".", 1)[0]] == "command line"
    assert text.count("# <- command line") == len(overrides)


def test_config_show_names_origins() -> None:
    from pipeline.preset_toml import origins

    where = origins("mnist1d", {"distill.method": "annealing", "distill.alpha": "0.5"})
    assert where["distill.train.lr"] == "method_defaults.annealing"
    assert where["distill.alpha"] == "command line"
    assert where["distill.temperature"] == "preset"
    assert where["distill.train.momentum"] == "default"
