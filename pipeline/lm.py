"""Language models: token-level KD losses computed on the fly from a sparse cache's raw values (or from a
dense teacher), and the training loop that reports perplexity.

Per real token (labels != -100; padding never contributes), with s the student's logits, z the teacher's,
T the temperature and q = softmax(s / T):

    topk       sum_i p~_i (log p~_i - log q_i),  p~ = softmax(z_topk / T) renormalised over the k kept
               tokens: the common baseline, biased (the missing mass is given to the kept tokens)
    topk-tail  the KL over k + 1 buckets, the kept tokens and the tail: p_i = exp(z_i / T - lse_T), exact
               when T is one of the cache's lse_temperatures; p_tail = 1 - sum p_i, and the student's
               tail is its own mass outside the kept ids. With k = V it is the dense KL.
    sampled    mean over S tokens x drawn from softmax(z) of w(x) (log p_T(x) - log q(x)), w = p_T / p_1
               (1 at T = 1): unbiased for the dense KL's value and gradient

each times T^2 (Hinton), mixed as (1 - alpha) * CE + alpha * KD. At a temperature the cache has no
logsumexp for, lse_T is approximated from the first stored one by a uniform tail (the V - k missing
logits taken equal, which keeps their total mass exact at the stored temperature); with
distill.sparse_exact such a temperature is refused instead.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.batches import ShardStream, cut_batches, positions_of
from pipeline.config import OptimConfig
from pipeline.errors import DivergedError
from pipeline.schedules import lr_at
from pipeline.store.dense import Buffer
from pipeline.store.sparse import PAD_LABEL
from pipeline.targets import SparseTargets
from pipeline.train import make_optimizer


class StreamedSequences(ShardStream):
    """Training batches from a sparse cache too big for memory (see ShardStream: whole shards in random
    order, each checked against its checksum, rows shuffled within a buffer; under DDP each rank its own
    shards): (positions of the sequences in the split, their teacher side on the CPU)."""

    def _epoch(
        self, generator: torch.Generator, batch_size: int, shards: list[int] | None
    ) -> Iterator[tuple[torch.Tensor, SparseTargets]]:
        m = self.store.manifest

        def parts() -> Iterator[tuple[torch.Tensor, Callable[[int, int], Held]]]:
            for buffer in self.store.iter_buffers(generator, shards=shards):
                at = positions_of(buffer.ids[buffer.order], self.split_ids)
                keep = self.keep[at]
                yield at[keep], functools.partial(_rows_of, buffer, buffer.order[keep])

        def join(a: Held, b: Held) -> Held:
            return torch.cat([a[0], b[0]]), {name: np.concatenate([a[1][name], b[1][name]]) for name in a[1]}

        for pos, (values, extras) in cut_batches(parts(), batch_size, join):
            yield pos, SparseTargets.from_arrays(values, extras, m.sparse, m.storage.dtype)


Held = tuple[torch.Tensor, dict[str, np.ndarray]]  # top-k values and the other arrays of some rows


def _rows_of(buffer: Buffer, rows: torch.Tensor, a: int, b: int) -> Held:
    """Rows rows[a:b] of a streamed buffer: its top-k values and its other arrays."""
    at = rows[a:b]
    return buffer.values[at], {name: array[at.numpy()] for name, array in buffer.extras.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 64
) -> tuple[float, float]:
    """(perplexity, token accuracy) over the real tokens."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        logits = model(x).float()
        nll += float(
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD_LABEL, reduction="sum")
        )
        real = y != PAD_LABEL
        correct += int(((logits.argmax(-1) == y) & real).sum())
        count += int(real.sum())
    count = max(count, 1)
    return math.exp(nll / count), correct / count


@dataclass
class LMEpoch:
    epoch: int  # 1-based
    lr: float
    train_loss: float
    val_perplexity: float
    val_token_accuracy: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)  # temperature, alpha used this epoch


@dataclass
class LMResult:
    history: list[LMEpoch]
    best_epoch: int
    best_val_perplexity: float
    test_perplexity: float
    test_token_accuracy: float
    seconds: float
    step_seconds: float  # median seconds of a training step


# inputs, labels, teacher side (or None), and the factor on the loss's gradient: 1 in one process; under
# DDP, world * this rank's real tokens / the global batch's, so the ranks' averaged gradients are those of
# the global batch's mean over its real tokens (one process with the same global batch)
Batch = tuple[torch.Tensor, torch.Tensor, Any, float]


def fit_lm(
    model: nn.Module,
    optim: OptimConfig,
    batches: Callable[[int], Iterator[Batch]],
    loss_at: Callable[[int], tuple[Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], dict]],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    on_epoch: Callable[[LMEpoch], None] | None = None,
) -> LMResult:
    """Train for optim.epochs (the LR set per epoch by optim.schedule), keep the weights of the best
    validation perplexity, and report test perplexity with them."""
    opt = make_optimizer(model, optim)
    history: list[LMEpoch] = []
    best: tuple[float, int, dict] | None = None
    steps: list[float] = []
    started = time.perf_counter()
    for epoch in range(optim.epochs):
        lr = lr_at(epoch, optim)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_fn, settings = loss_at(epoch)
        model.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        for inputs, labels, teacher, scale in batches(epoch):
            s0 = time.perf_counter()
            loss = loss_fn(model(inputs), labels, teacher)
            if not torch.isfinite(loss):
                raise DivergedError(epoch + 1, float(loss))
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            opt.step()
            steps.append(time.perf_counter() - s0)
            total, count = total + float(loss.detach()), count + 1
        perplexity, token_accuracy = evaluate(model, *val, device)
        record = LMEpoch(
            epoch + 1,
            lr,
            total / max(count, 1),
            perplexity,
            token_accuracy,
            time.perf_counter() - t0,
            settings,
        )
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if best is None or perplexity < best[0]:
            best = (perplexity, epoch + 1, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    test_perplexity, test_accuracy = evaluate(model, *test, device)
    return LMResult(
        history, best[1], best[0], test_perplexity, test_accuracy, time.perf_counter() - started,
        float(np.median(steps)) if steps else 0.0,
    )  # fmt: skip
