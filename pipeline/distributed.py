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


def init() -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Ranks(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
    )


def device_for(ranks: Ranks, device_name: str, picked: torch.device) -> torch.device:
    """One GPU per local rank when there are GPUs; the CPU otherwise."""
    if ranks.active and device_name == "auto" and picked.type == "cuda":
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
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box)  # gloo and nccl both sum int64 on the CPU tensor's backend
    return int(box.item())
