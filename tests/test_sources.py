"""Other data and models: .npz files, ImageFolder trees, torchvision models, module:factory, CIFAR errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Paths
from tests.test_cli import assert_one_line_error, kd


def write_preset(path: Path, dataset: str, teacher: str, student: str, extra: str = "") -> str:
    path.write_text(
        f"""
[dataset]
{dataset}
val_size = 8
[teacher]
name = "t"
[teacher.model]
{teacher}
[teacher.train]
epochs = 3
lr = 3e-3
batch_size = 16
[student]
{student}
[cache]
batch_size = 16
[distill]
temperature = 2.0
[distill.train]
epochs = 3
batch_size = 16
{extra}
"""
    )
    return str(path)


def gaussian_npz(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 12)) * 3
    files = []
    for split, n in (("train", 120), ("test", 60)):
        y = rng.integers(0, 3, n)
        x = centers[y] + rng.normal(size=(n, 12))
        files.append(folder / f"{split}.npz")
        np.savez(files[-1], x=x.astype(np.float32), y=y)
    return files[0], files[1]


def test_npz_data_with_a_factory_student(tmp_path: Path) -> None:
    train, test = gaussian_npz(tmp_path)
    preset = write_preset(
        tmp_path / "npz.toml",
        f'name = "npz"\noptions = {{ train = "{train}", test = "{test}" }}',
        'arch = "mlp"\noptions = { hidden = [32] }',
        'arch = "tests.factories:small_net"\noptions = { width = 8 }',
    )
    paths = Paths(data=tmp_path / "data")
    for args in (["train-teacher"], ["teacher-logits"], ["distill", "--run-name", "npz"]):
        result = kd(paths, *args, "--preset", preset)
        assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "npz" / "summary.json").read_text())
    assert summary["student_test_accuracy"] > 0.6  # three well separated clusters; chance is 1/3
    record = json.loads((paths.runs / "npz" / "checkpoint" / "config.json").read_text())
    assert record["architecture"]["arch"] == "tests.factories:small_net"


def test_factory_checkpoints_need_trust(tmp_path: Path) -> None:
    train, test = gaussian_npz(tmp_path)
    dataset = f'name = "npz"\noptions = {{ train = "{train}", test = "{test}" }}'
    trusted = write_preset(tmp_path / "a.toml", dataset, 'arch = "tests.factories:small_net"', 'arch = "mlp"')
    paths = Paths(data=tmp_path / "data")
    assert kd(paths, "train-teacher", "--preset", trusted).exit_code == 0
    assert kd(paths, "teacher-logits", "--preset", trusted, "--force").exit_code == 0
    other = write_preset(tmp_path / "b.toml", dataset, 'arch = "mlp"', 'arch = "mlp"')
    # someone else's checkpoint, named explicitly (under the preset's own teacher.name the architecture
    # check would stop first: the preset says mlp)
    result = kd(paths, "teacher-logits", "--preset", other, "--teacher", str(paths.teachers / "t"), "--force")
    assert_one_line_error(result, "is built by code ('tests.factories:small_net')")


def make_images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, color in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        (root / label).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(np.array(color) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_image_folder_with_a_torchvision_teacher(tmp_path: Path) -> None:
    make_images(tmp_path / "train", 16, 0)
    make_images(tmp_path / "test", 6, 1)
    preset = write_preset(
        tmp_path / "img.toml",
        f'name = "imagefolder"\noptions = {{ train = "{tmp_path / "train"}", '
        f'test = "{tmp_path / "test"}", size = 32 }}',
        'arch = "torchvision:resnet18"',
        'arch = "resnet8"',
    )
    paths = Paths(data=tmp_path / "data")
    distill = ["distill", "--run-name", "img", "--set", "distill.train.augment=crop-flip"]
    for args in (["train-teacher"], ["teacher-logits"], distill):
        result = kd(paths, *args, "--preset", preset)
        assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "img" / "summary.json").read_text())
    cache = next(paths.logits.glob("t.imagefolder.train.*.zarr"))
    assert summary["teacher"] == "t" and summary["cache"] == str(cache)  # trained from the dumped cache
    manifest = json.loads(kd(paths, "cache", "info", str(cache), "--json").stdout)
    assert manifest["preprocessing"]["classes"] == ["cat", "dog"] and manifest["dataset"]["length"] == 32


def test_source_errors_are_one_line(tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    result = kd(
        paths,
        "distill",
        "--preset",
        "tiny",
        "--method",
        "ce",
        "--set",
        "dataset.name=cifar10",
        "--set",
        f"dataset.options.root={tmp_path / 'nothing'}",
    )
    assert_one_line_error(result, "cifar10 is not under")
    result = kd(
        paths,
        "distill",
        "--preset",
        "tiny",
        "--method",
        "ce",
        "--set",
        "student.arch=torchvision:nope",
        "--set",
        "student.options={}",
    )
    assert_one_line_error(result, "unknown torchvision model 'nope'")
    result = kd(
        paths, "distill", "--preset", "tiny", "--method", "ce", "--set", "student.arch=nosuch.module:f"
    )
    assert_one_line_error(result, "cannot load model factory 'nosuch.module:f'")
    result = kd(
        paths, "distill", "--preset", "tiny", "--method", "ce", "--set", "distill.train.augment=crop-flip"
    )
    assert_one_line_error(result, "augment 'crop-flip' needs images")
    result = kd(paths, "distill", "--preset", "tiny", "--method", "ce", "--set", "dataset.name=npz")
    assert_one_line_error(result, "dataset 'npz' needs dataset.options.train")


def test_labels_must_fit_the_teacher(tiny_data: Paths, tmp_path: Path) -> None:
    train, test = gaussian_npz(tmp_path)
    preset = write_preset(
        tmp_path / "m.toml",
        f'name = "npz"\noptions = {{ train = "{train}", test = "{test}" }}',
        'arch = "cnn1d"\noptions = { channels = 32, dropout = 0.2 }',  # the tiny teacher's architecture
        'arch = "mlp"',
    )
    paths = Paths(data=tmp_path / "data")
    (paths.teachers / "t").mkdir(parents=True)
    for f in (tiny_data.teachers / "tiny-cnn1d").iterdir():  # a 10-class teacher for 3-class data
        (paths.teachers / "t" / f.name).write_bytes(f.read_bytes())
    result = kd(paths, "teacher-logits", "--preset", preset)
    assert_one_line_error(result, "teacher 't' has 10 classes but npz has 3")


def test_paths_and_factories_next_to_the_preset_from_any_working_directory(
    tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    """A preset's relative paths mean "next to the preset file", and a `module:factory` module beside it
    imports without PYTHONPATH; the missing-cache hint names the preset as it was given (a path)."""
    project = tmp_path / "project"
    (project / "arrays").mkdir(parents=True)
    gaussian_npz(project / "arrays")
    (project / "my_models.py").write_text(
        "from torch import nn\n\n\n"
        "def tiny(num_classes, input_shape, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(),"
        " nn.Linear(width, num_classes))\n"
    )
    write_preset(
        project / "mine.toml",
        'name = "npz"\noptions = { train = "arrays/train.npz", test = "arrays/test.npz" }',
        'arch = "my_models:tiny"',
        'arch = "mlp"\noptions = { hidden = [16] }',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    paths = Paths(data=tmp_path / "data")
    given = str(Path("..") / "project" / "mine.toml")
    missing = kd(paths, "distill", "--preset", given)
    assert_one_line_error(missing, f"run `kd teacher-logits --preset {given}`")
    for args in (["train-teacher"], ["teacher-logits"], ["distill", "--run-name", "beside"]):
        result = kd(paths, *args, "--preset", given)
        assert result.exit_code == 0, result.output
    config = json.loads((paths.runs / "beside" / "config.json").read_text())
    assert config["preset"]["dataset"]["options"]["train"] == str(
        (project / "arrays" / "train.npz").resolve()
    )


def test_a_model_with_the_wrong_head_is_one_line(tmp_path: Path) -> None:
    """A student giving 4 logits for 3 classes used to train with ce (and report nonsense) or die with a
    traceback in kd; a factory returning no Module died with an AttributeError."""
    train, test = gaussian_npz(tmp_path)
    dataset = f'name = "npz"\noptions = {{ train = "{train}", test = "{test}" }}'
    for factory, message in (
        (
            "wrong_head",
            "the student 'tests.factories:wrong_head' returns (2, 4) for 2 samples, but the data has 3",
        ),
        ("not_a_module", "'tests.factories:not_a_module' returned a str, not a torch.nn.Module"),
    ):
        preset = write_preset(
            tmp_path / f"{factory}.toml", dataset, 'arch = "mlp"', f'arch = "tests.factories:{factory}"'
        )
        result = kd(
            Paths(data=tmp_path / "data"),
            "distill",
            "--preset",
            preset,
            "--method",
            "ce",
            "--run-name",
            factory,
        )
        assert_one_line_error(result, message)
        assert not (tmp_path / "data" / "runs" / factory).exists()  # nothing written
