"""Both stages under torchrun: two gloo processes on the CPU (also on a machine with GPUs), and nccl on a
GPU where there is one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import Paths
from pipeline.errors import KDError
from pipeline.store import LogitStore
from tests.conftest import cache_paths
from tests.factories import PRECISION
from tests.test_cli import kd
from tests.test_resume import array_files


def torchrun(
    data: Path, *args: str, nproc: int = 2, device: str | None = "cpu"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("KD_FAULT_AFTER_SHARDS", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stages.cli",
        "--data-dir",
        str(data),
        *args,
        *(["--device", device] if device else []),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def cpu_reference(made: Paths, tmp_path: Path, *argv: str) -> Paths:
    """`made`'s caches where they were dumped on the CPU (fp32 teacher); on a GPU machine, where the
    fixtures' teacher ran in bf16, the same dump (`argv`) made again in one CPU process."""
    if PRECISION == "fp32":
        return made
    paths = Paths(data=tmp_path / "cpu")
    shutil.copytree(made.teachers, paths.teachers)
    result = kd(paths, "teacher-logits", "--preset", "tiny", *argv, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return paths


@pytest.mark.slow
def test_two_process_dump_is_byte_identical(tiny_data: Paths, tmp_path: Path) -> None:
    data = tmp_path / "ddp"
    shutil.copytree(tiny_data.teachers, data / "teachers")
    result = torchrun(data, "teacher-logits", "--preset", "tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("2 processes") == 2  # rank 0 reports, once per split
    reference = cpu_reference(tiny_data, tmp_path)
    for split in ("train", "test"):
        (single,) = cache_paths(reference, split)
        (double,) = cache_paths(Paths(data=data), split)
        assert single.name == double.name  # same content address
        assert array_files(double) == array_files(single)  # every chunk of every array, byte for byte
        store = LogitStore.open(double)
        store.require_complete()
        assert store.manifest.shard_crc32c == LogitStore.open(single).manifest.shard_crc32c
        assert not double.with_name(double.name + ".lock").exists()


@pytest.mark.slow
def test_ddp_distill_writes_one_summary(tiny_data: Paths, tmp_path: Path) -> None:
    data = tmp_path / "ddp"
    shutil.copytree(tiny_data.logits, data / "logits")
    result = torchrun(data, "distill", "--preset", "tiny", "--epochs", "4", "--run-name", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((data / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]
    summary = json.loads((runs[0] / "summary.json").read_text())
    metrics = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4  # written by rank 0 only
    assert json.loads((runs[0] / "config.json").read_text())["mode"] == "ddp x2"
    assert summary["student_test_accuracy"] > 0.2
    # README: "a run matches a one-process run with the same global batch": per-epoch validation accuracy
    argv = ["distill", "--preset", "tiny", "--epochs", "4", "--run-name", "one", "--device", "cpu"]
    one = kd(Paths(data=data), *argv)
    assert one.exit_code == 0, one.output
    single = [json.loads(line)["val_accuracy"] for line in (data / "runs" / "one" / "metrics.jsonl").open()]
    assert [json.loads(line)["val_accuracy"] for line in metrics] == single


@pytest.mark.slow
def test_ddp_over_a_streamed_cache_partitions_its_shards(tiny_data: Paths, tmp_path: Path) -> None:
    data = tmp_path / "ddp"
    shutil.copytree(tiny_data.logits, data / "logits")
    argv = [
        "distill",
        "--preset",
        "tiny",
        "--epochs",
        "4",
        "--run-name",
        "s",
        "--set",
        "distill.memory_budget_mb=0",
    ]
    result = torchrun(data, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((data / "runs" / "s" / "config.json").read_text())
    assert config["batches"] == "cache streamed (shard-shuffled), shards partitioned across 2 processes"
    summary = json.loads((data / "runs" / "s" / "summary.json").read_text())
    # every epoch, the two processes together read the cache's logits once (counted in each, summed)
    one_copy = 800 * 10 * 2  # float16 logits
    assert summary["cache_bytes_read"] == 4 * one_copy  # 4 epochs; each rank reading all would be 8
    # measured 0.23 after 4 epochs: with 4 uneven shards (256, 256, 256, 32 rows) a rank's epoch stops at
    # the smaller share's batches, so ~25% of the rows sit each epoch out (README: many shards fix it)
    assert summary["student_test_accuracy"] > 0.15


def test_shards_are_dealt_round_robin() -> None:
    """README: "the missing shards are dealt round-robin, so each shard has exactly one writer"."""
    from pipeline.teacher_pass import shards_of

    plan = [0, 2, 3, 5, 6, 7, 9]
    dealt = [shards_of(plan, rank, 3) for rank in range(3)]
    assert dealt == [[0, 5, 9], [2, 6], [3, 7]]


@pytest.mark.parametrize(
    ("local_world", "name", "message"),
    [
        ("4", "cuda", "started 4 processes on this machine but it has 2 GPU(s): use --nproc_per_node=2"),
        ("2", "cuda:1", "--device cuda:1 names one GPU, but under torchrun each process takes the GPU"),
    ],
)
def test_gpu_processes_need_a_gpu_each(
    monkeypatch: pytest.MonkeyPatch, local_world: str, name: str, message: str
) -> None:
    """nccl refuses two processes on one GPU (it showed as a CUDA traceback): refused up front, in words."""
    from pipeline.training.distributed import init

    monkeypatch.setenv("WORLD_SIZE", local_world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KDError) as refused:
        init(torch.device(name))
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("backend", "expected"), [("nccl", "cuda:0"), ("gloo", "cpu")])
def test_collectives_use_a_tensor_where_the_backend_reduces(
    monkeypatch: pytest.MonkeyPatch, backend: str, expected: str
) -> None:
    """nccl reduces only tensors on the process's GPU (a CPU tensor failed the streamed bytes count)."""
    from pipeline.training import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device() == torch.device(expected)


@pytest.mark.gpu
@pytest.mark.slow
def test_torchrun_on_a_gpu_uses_nccl(tiny_data: Paths, tmp_path: Path) -> None:
    data = tmp_path / "ddp"
    shutil.copytree(tiny_data.logits, data / "logits")
    argv = ["distill", "--preset", "tiny", "--epochs", "2", "--run-name", "nccl"]
    result = torchrun(data, *argv, nproc=1, device=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((data / "runs" / "nccl" / "summary.json").read_text())["device"].startswith("cuda")
    if torch.cuda.device_count() == 1:  # more processes than GPUs: one line from each process, no traceback
        result = torchrun(data, *argv[:-1], "again", nproc=2, device=None)
        assert result.returncode != 0
        assert "error: torchrun started 2 processes on this machine but it has 1 GPU(s)" in result.stderr
        assert "AcceleratorError" not in result.stderr and not (data / "runs" / "again").exists()
