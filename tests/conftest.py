from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would hang ~30 s
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Paths, load_preset  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """A data dir with the tiny preset's teacher trained and its train/test logits dumped (once)."""
    from stages import teacher_logits, train_teacher

    paths = Paths(data=tmp_path_factory.mktemp("data"))
    preset = load_preset("tiny")
    train_teacher.run(preset, paths)
    teacher_logits.run(preset, paths)
    return paths


def cache_paths(paths: Paths, split: str, teacher: str = "tiny-cnn1d") -> list[Path]:
    return sorted(paths.logits.glob(f"{teacher}.*.{split}.*.zarr"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # end-to-end tests (a trained teacher, real caches): slow per mutant for mutmut
        if "tiny_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
