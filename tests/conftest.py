from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would hang ~30 s
os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (and its subprocesses): on 2 cores, two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers with a thread pool each spin against each other

import socket  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Paths, load_preset, with_overrides  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 (a thread of this process, real HTTP) with an empty bucket: one per
    session, since fsspec caches its S3 filesystem (and so the endpoint) across tests."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fs, _ = fsspec.core.url_to_fs("s3://team-bucket")
    fs.mkdir("team-bucket")
    try:
        yield "s3://team-bucket/caches"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


VIEW_SETTINGS = {"cache.augment": "shift", "cache.augment_pad": 2, "cache.views": 3}  # 3 of 5 shifts
VIEW_ARGS = [arg for key, value in VIEW_SETTINGS.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def views_data(tiny_data: Paths, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """The tiny teacher's train split cached as 3 of the 5 shifts (pad 2) of every row."""
    from stages import teacher_logits

    paths = Paths(data=tmp_path_factory.mktemp("views"))
    shutil.copytree(tiny_data.teachers, paths.teachers)
    teacher_logits.run(with_overrides(load_preset("tiny"), VIEW_SETTINGS), paths)
    return paths


def view_cache(paths: Paths) -> Path:
    from pipeline.store import LogitStore

    (path,) = [p for p in cache_paths(paths, "train") if LogitStore.open(p).manifest.views]
    return path


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    from stages import teacher_logits, train_teacher

    paths = Paths(data=tmp_path_factory.mktemp("lm"))
    preset = load_preset("tiny-lm")
    train_teacher.run(preset, paths, device_name="cpu")
    teacher_logits.run(preset, paths, device_name="cpu")
    return paths


def lm_cache(paths: Paths, split: str = "train") -> Path:
    (path,) = cache_paths(paths, split, teacher="tiny-gpt")
    return path


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
