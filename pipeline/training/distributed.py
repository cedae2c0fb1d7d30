"""torch.distributed, as torchrun sets it up: ranks, devices, barriers. One process when not launched.

    torchrun --standalone --nproc_per_node=2 -m stages.cli teacher-logits --preset mnist1d
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
             --nproc_per_node=8 -m stages.cli distill --preset ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import KDError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: torch.device | None = None) -> Ranks:
    """Join the process group torchrun describes in the environment: nccl when the processes run on GPUs
    (`device`, as picked for this process), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    on_gpu = device is not None and device.type == "cuda"
    if on_gpu:
        check_one_gpu_each(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return Ranks(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
    )


def check_one_gpu_each(device: torch.device) -> None:
    """Under torchrun on GPUs every process of a machine takes the GPU of its local rank (nccl refuses
    two processes on one GPU): so no GPU index may be named, and there must be a GPU per process."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if device.index is not None:
        raise KDError(
            f"--device {device} names one GPU, but under torchrun each process takes the GPU of its local "
            "rank: use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if local_world > gpus:
        raise KDError(
            f"torchrun started {local_world} processes on this machine but it has {gpus} GPU(s): use "
            f"--nproc_per_node={gpus}, or --device cpu to run them all on the CPU"
        )


def device_for(ranks: Ranks, picked: torch.device) -> torch.device:
    """One GPU per local rank when the processes run on GPUs; the picked device otherwise."""
    if ranks.active and picked.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return picked


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(ranks: Ranks, value: int) -> int:
    """The sum of an integer over every rank (the value itself in one process)."""
    if not ranks.active:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(box)
    return int(box.item())


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: nccl reduces only tensors on this process's GPU,
    gloo only tensors on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
