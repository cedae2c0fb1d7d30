"""Training-loop parts shared by every stage: device, seeding, optimizer, one epoch, evaluation, fit."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.batches import Batch
from pipeline.config import OptimConfig
from pipeline.schedules import lr_at

# (student_logits, teacher_logits or None, labels) -> scalar loss
BatchLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu, unless a device is named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def predict(
    model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Logits (N, C) on the CPU, in eval mode."""
    model.eval()
    outs = [
        model(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    lr: float
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float | None
    seconds: float


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float | None  # at the best-validation epoch: test is reported, never used to select
    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], loss_fn: BatchLoss
) -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over the samples seen."""
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for batch in batches:
        logits = model(batch.inputs)  # (B, C)
        loss = loss_fn(logits, batch.teacher_logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulate on device: no host sync per batch
        n = len(batch.labels)
        total_loss = total_loss.to(loss.device) + loss.detach().double() * n
        correct = correct.to(loss.device) + (logits.detach().argmax(1) == batch.labels).sum()
        seen += n
    return float(total_loss) / max(seen, 1), float(correct) / max(seen, 1)


def fit(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    batches: Callable[[int], Iterable[Batch]],
    loss_at: Callable[[int], BatchLoss],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    on_epoch: Callable[[EpochRecord, bool], None] | None = None,
    desc: str = "train",
) -> FitResult:
    """Train for cfg.epochs; keep the weights of the best validation epoch (ties: the earlier one)."""
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    result = FitResult(best_epoch=0, best_val_accuracy=-1.0, test_accuracy=None, best_state={})
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False, dynamic_ncols=True, disable=None)
    for epoch in bar:
        t0 = time.perf_counter()
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss, train_acc = train_epoch(model, optimizer, batches(epoch), loss_at(epoch))
        val_acc = accuracy(predict(model, val[0], device), val[1])
        test_acc = None if test is None else accuracy(predict(model, test[0], device), test[1])
        record = EpochRecord(
            epoch + 1, lr, train_loss, train_acc, val_acc, test_acc, time.perf_counter() - t0
        )
        result.history.append(record)
        improved = val_acc > result.best_val_accuracy
        if improved:
            result.best_epoch, result.best_val_accuracy, result.test_accuracy = epoch + 1, val_acc, test_acc
            result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        bar.set_postfix(
            loss=f"{train_loss:.3f}", val=f"{val_acc:.3f}", best=f"{result.best_val_accuracy:.3f}"
        )
        if on_epoch is not None:
            on_epoch(record, improved)
    bar.close()
    result.seconds = time.perf_counter() - start
    model.load_state_dict(result.best_state)
    return result
