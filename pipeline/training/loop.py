"""The training loop of every stage (`fit`, for classifiers and language models alike: `Task`), its
epoch record, and the parts around it: device, seeding, optimizer, scoring; `fit_many` trains N
students of one architecture at once (one-pass sweeps)."""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import OptimConfig
from pipeline.data.readers import SampleReader, iter_rows
from pipeline.distill.batches import Batch
from pipeline.distill.losses import IGNORE, cross_entropy, hinton_kd, kd_weights
from pipeline.distill.schedules import lr_at
from pipeline.errors import DivergedError, KDError
from pipeline.training.progress import Progress

# (student_logits, teacher_logits or None, labels) -> scalar loss
BatchLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu, unless a device is named."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise KDError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KDError(
                f"device '{name}' asked for, but this machine has no usable CUDA GPU: use auto or cpu"
            )
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise KDError(
                f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        if device.type == "mps" and not (torch.backends.mps.is_available()):
            raise KDError(f"device '{name}' asked for, but MPS is not available here: use auto or cpu")
        return device
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


def make_optimizer(model: nn.Module | Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = model.parameters() if isinstance(model, nn.Module) else model
    if cfg.optimizer == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise KDError("nesterov needs momentum > 0: set momentum (e.g. 0.9) or nesterov = false")
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def predict(
    model: nn.Module, inputs: torch.Tensor | SampleReader, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Logits (N, C) on the CPU, in eval mode (a streamed source's rows decoded ahead by its workers)."""
    model.eval()
    outs = [model(x.to(device)).float().cpu() for x in iter_rows(inputs, batch_size)]
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def score_rows(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    """{"accuracy"} of a classifier on these rows."""
    return {"accuracy": accuracy(predict(model, inputs, device), labels)}


@torch.no_grad()
def score_sequences(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 64
) -> dict:
    """{"perplexity", "token_accuracy"} of a language model over the real tokens (labels != -100)."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        logits = model(x).float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
        real = y != IGNORE
        correct += int(((logits.argmax(-1) == y) & real).sum())
        count += int(real.sum())
    count = max(count, 1)
    return {"perplexity": math.exp(nll / count), "token_accuracy": correct / count}


@dataclass(frozen=True)
class Task:
    """What a model predicts and how its epochs are scored: rows of classes, or token sequences."""

    name: str  # "classification" or "sequence"
    metric: str  # the validation metric that selects the checkpoint
    higher_is_better: bool
    score: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.device], dict[str, float]]
    test_each_epoch: bool  # the test split scored every epoch (cheap for rows); else once, best weights
    unit: str  # how the metric is shown: "%" or "ppl"

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` beats the best so far (ties keep the earlier epoch)."""
        return best is None or (value > best if self.higher_is_better else value < best)

    def shown(self, value: float) -> str:
        return f"{100 * value:.2f}%" if self.unit == "%" else f"{value:.2f} {self.unit}"


CLASSES = Task("classification", "accuracy", True, score_rows, True, "%")
SEQUENCES = Task("sequence", "perplexity", False, score_sequences, False, "ppl")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of any run (a teacher, a student, one student of a one-pass sweep)."""

    epoch: int  # 1-based
    lr: float
    train_loss: float
    train_accuracy: float | None  # rows; None for token sequences
    val: dict[str, float]  # the task's metrics: accuracy; or perplexity and token_accuracy
    test: dict[str, float | None] | None  # the same every epoch (None values: no test split), or None
    seconds: float

    def line(self) -> dict[str, Any]:
        """The record as a metrics.jsonl line: epoch, lr, train_loss[, train_accuracy], val_<metric>...,
        [test_<metric>...,] seconds."""
        out: dict[str, Any] = {"epoch": self.epoch, "lr": self.lr, "train_loss": self.train_loss}
        if self.train_accuracy is not None:
            out["train_accuracy"] = self.train_accuracy
        out.update({f"val_{k}": v for k, v in self.val.items()})
        out.update({f"test_{k}": v for k, v in (self.test or {}).items()})
        out["seconds"] = self.seconds
        return out

    @property
    def val_accuracy(self) -> float:
        return self.val["accuracy"]

    @property
    def test_accuracy(self) -> float | None:
        return None if self.test is None else self.test.get("accuracy")

    @property
    def val_perplexity(self) -> float:
        return self.val["perplexity"]


@dataclass
class FitResult:
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)  # the task's metrics at the best epoch
    test: dict[str, float | None] | None = None  # with the best weights: test is reported, never selects
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0  # the median training step

    @property
    def best_val_accuracy(self) -> float:
        return self.best_val["accuracy"]

    @property
    def test_accuracy(self) -> float | None:
        return None if self.test is None else self.test.get("accuracy")

    @property
    def best_val_perplexity(self) -> float:
        return self.best_val["perplexity"]

    @property
    def test_perplexity(self) -> float | None:
        return None if self.test is None else self.test.get("perplexity")

    @property
    def test_token_accuracy(self) -> float | None:
        return None if self.test is None else self.test.get("token_accuracy")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss_fn: BatchLoss,
    *,
    count_correct: bool = True,
    steps: list[float] | None = None,
) -> tuple[float, float | None]:
    """One pass; returns (mean loss over the rows seen, their accuracy, or None without
    `count_correct`). The batches come augmented (or not) from their source, pipeline.distill.batches:
    the loop never augments. A batch's `scale` multiplies its gradient (DDP token weighting); `steps` collects
    each step's seconds."""
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for batch in batches:
        started = time.perf_counter()
        logits = model(batch.inputs)  # (B, C) or (B, L, V)
        loss = loss_fn(logits, batch.teacher_logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        (loss if batch.scale == 1.0 else loss * batch.scale).backward()
        optimizer.step()
        # accumulate on device: no host sync per batch
        n = len(batch.labels)
        total_loss = total_loss.to(loss.device) + loss.detach().double() * n
        if count_correct:
            correct = correct.to(loss.device) + (logits.detach().argmax(1) == batch.labels).sum()
        seen += n
        if steps is not None:
            steps.append(time.perf_counter() - started)
    return float(total_loss) / max(seen, 1), float(correct) / max(seen, 1) if count_correct else None


def fit(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    batches: Callable[[int], Iterable[Batch]],
    loss_at: Callable[[int], BatchLoss],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    task: Task = CLASSES,
    on_epoch: Callable[[EpochRecord, bool], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> FitResult:
    """The training loop of every stage, for classifiers and language models (`task`): cfg.epochs
    epochs, the LR set per epoch by cfg.schedule, the weights of the best validation epoch kept (ties:
    the earlier one) and loaded at the end, the test split scored with them."""
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    result, best = FitResult(), None
    steps: list[float] = []
    start = time.perf_counter()
    bar = Progress(total=cfg.epochs, desc=desc, unit="epoch", enabled=progress)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss, train_acc = train_epoch(
            model,
            optimizer,
            batches(epoch),
            loss_at(epoch),
            count_correct=task.name == "classification",
            steps=steps,
        )
        if not math.isfinite(train_loss):
            bar.close()
            raise DivergedError(epoch + 1, train_loss)
        val_scores = task.score(model, val[0], val[1], device)
        test_scores = None
        if task.test_each_epoch:
            test_scores = dict.fromkeys(val_scores) if test is None else task.score(model, *test, device)
        record = EpochRecord(
            epoch + 1, lr, train_loss, train_acc, val_scores, test_scores, time.perf_counter() - t0
        )
        result.history.append(record)
        improved = task.better(val_scores[task.metric], best)
        if improved:
            best = val_scores[task.metric]
            result.best_epoch, result.best_val, result.test = epoch + 1, val_scores, test_scores
            result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        bar.update(
            1,
            loss=f"{train_loss:.4f}",
            val=task.shown(val_scores[task.metric]),
            best=f"{task.shown(best)} (epoch {result.best_epoch})",  # type: ignore[arg-type]
        )
        if on_epoch is not None:
            on_epoch(record, improved)
    bar.close()
    model.load_state_dict(result.best_state)
    if not task.test_each_epoch and test is not None:
        result.test = task.score(model, *test, device)
    result.seconds = time.perf_counter() - start
    result.step_seconds = float(np.median(steps)) if steps else 0.0
    return result


def fit_many(
    models: Sequence[nn.Module],
    cfg: OptimConfig,
    *,
    batches: Callable[[int], Iterable[Batch]],
    loss_at: Sequence[Callable[[int], BatchLoss]],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    on_epoch: Callable[[int, nn.Module, EpochRecord, bool], None] | None = None,
    desc: str = "one-pass",
) -> list[FitResult]:
    """fit() for N models of one architecture at once, over one stream of batches: parameters stacked
    along a new first dimension and the forward pass vmapped (torch.func), each model with its own loss.
    The optimizers are elementwise, so model i gets the updates fit() would give it with loss_at[i], up
    to floating-point rounding. Models with buffers (BatchNorm statistics) are refused, and dropout draws
    other random masks than a sequential run (randomness="different")."""
    from torch.func import functional_call, stack_module_state, vmap

    if any(True for m in models for _ in m.buffers()):
        raise KDError(
            "one-pass training needs students without buffers (e.g. BatchNorm): use --mode sequential"
        )
    n = len(models)
    params, _ = stack_module_state([m.to(device) for m in models])  # name -> (N, ...) leaves
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, p, (x,))

    stacked = vmap(forward, in_dims=(0, None), randomness="different")  # (N, B, C)
    optimizer = make_optimizer(list(params.values()), cfg)

    def predict_all(inputs: Any, batch_size: int = 1024) -> torch.Tensor:  # (N, rows, C) on CPU
        base.eval()
        with torch.no_grad():  # a streamed source's rows decoded ahead by its workers
            return torch.cat(
                [stacked(params, x.to(device)).float().cpu() for x in iter_rows(inputs, batch_size)], dim=1
            )

    def model_of(i: int) -> nn.Module:
        models[i].load_state_dict({k: v[i].detach() for k, v in params.items()})
        return models[i]

    results = [FitResult() for _ in range(n)]
    start = time.perf_counter()
    bar = Progress(total=cfg.epochs, desc=f"{desc} ({n} students)", unit="epoch")
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = [loss_at[i](epoch) for i in range(n)]
        base.train()
        total_loss = torch.zeros(n, dtype=torch.float64, device=device)
        correct = torch.zeros(n, dtype=torch.int64, device=device)
        seen = 0
        vectorized = _stacked_kd_settings(losses, device)
        for batch in batches(epoch):
            logits = stacked(params, batch.inputs)  # (N, B, C), one view for all
            if vectorized is not None:  # kd / ce students: all N losses in the ops of one
                per_model = hinton_kd(logits, batch.teacher_logits, batch.labels, **vectorized)
            else:
                per_model = torch.stack(
                    [losses[i](logits[i], batch.teacher_logits, batch.labels) for i in range(n)]
                )
            optimizer.zero_grad(set_to_none=True)
            per_model.sum().backward()  # model i's parameters only see loss i
            optimizer.step()
            total_loss += per_model.detach().double() * len(batch.labels)
            correct += (logits.detach().argmax(2) == batch.labels).sum(1)
            seen += len(batch.labels)
        for i in range(n):
            if not math.isfinite(float(total_loss[i])):
                raise DivergedError(epoch + 1, float(total_loss[i]), f" of student {i + 1} of {n}")
        val_logits = predict_all(val[0])
        test_logits = None if test is None else predict_all(test[0])
        seconds = (time.perf_counter() - t0) / n  # each model's share of the epoch
        val_accs = [accuracy(val_logits[i], val[1]) for i in range(n)]
        for i, result in enumerate(results):
            val_acc = val_accs[i]
            test_acc = None if test_logits is None else accuracy(test_logits[i], test[1])
            record = EpochRecord(
                epoch + 1,
                lr,
                float(total_loss[i]) / max(seen, 1),
                float(correct[i]) / max(seen, 1),
                {"accuracy": val_acc},
                {"accuracy": test_acc},
                seconds,
            )
            result.history.append(record)
            improved = CLASSES.better(val_acc, result.best_val.get("accuracy"))
            if improved:
                result.best_epoch, result.best_val, result.test = epoch + 1, record.val, record.test
                result.best_state = {k: v[i].detach().cpu().clone() for k, v in params.items()}
            if on_epoch is not None:
                on_epoch(i, model_of(i) if improved else models[i], record, improved)
        best = max(results, key=lambda r: r.best_val_accuracy)
        bar.update(
            1,
            loss=f"{float(total_loss.mean()) / max(seen, 1):.4f} (mean)",
            val=f"{100 * sum(val_accs) / n:.2f}% (mean)",
            best=f"{100 * best.best_val_accuracy:.2f}% (student {results.index(best) + 1})",
        )
    bar.close()
    elapsed = time.perf_counter() - start
    for i, result in enumerate(results):
        result.seconds = elapsed / n
        models[i].load_state_dict(result.best_state)
    return results


def _stacked_kd_settings(losses: Sequence[BatchLoss], device: torch.device) -> dict[str, Any] | None:
    """Per-student (temperature, ce_weight, kd_weight, label_smoothing) tensors when every loss is a
    partial of hinton_kd or cross_entropy with one standardize setting; None otherwise (one loss call per
    student)."""
    if not all(isinstance(f, functools.partial) and f.func in (hinton_kd, cross_entropy) for f in losses):
        return None
    # cross_entropy is hinton_kd at alpha 0
    settings = [{"temperature": 1.0, "alpha": 0.0, "standardize": False, **f.keywords} for f in losses]  # type: ignore[attr-defined]
    if len({s["standardize"] for s in settings}) > 1:
        return None
    for s in settings:
        s["ce_weight"], s["kd_weight"] = kd_weights(s["alpha"], s.get("ce_weight"), s.get("kd_weight"))
    return {
        **{
            k: torch.tensor([float(s.get(k, 0.0)) for s in settings], device=device)
            for k in ("temperature", "ce_weight", "kd_weight", "label_smoothing")
        },
        "standardize": settings[0]["standardize"],
    }
