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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.batches import ShardStream, cut_batches, positions_of
from pipeline.config import OptimConfig
from pipeline.errors import DivergedError, KDError
from pipeline.schedules import lr_at
from pipeline.store.dense import Buffer
from pipeline.store.encoding import decode_logits
from pipeline.store.sparse import PAD_LABEL, stored_at, uniform_tail_logit
from pipeline.train import make_optimizer

SPARSE_TARGETS = ("topk-tail", "topk", "sampled")


@dataclass(frozen=True)
class SparseTargets:
    """The teacher side of a batch of token sequences, as a sparse cache stores it (float32 on device)."""

    values: torch.Tensor  # (B, L, k) raw top-k logits
    ids: torch.Tensor  # (B, L, k) int64
    lse: torch.Tensor  # (B, L, T) logsumexp of the full row at each stored temperature
    temperatures: tuple[float, ...]
    vocab: int
    sampled_ids: torch.Tensor | None = None  # (B, L, S) int64
    sampled_logits: torch.Tensor | None = None  # (B, L, S)

    @classmethod
    def from_arrays(
        cls, values: torch.Tensor, extras: Mapping[str, np.ndarray], entry: Mapping, storage: str = "float16"
    ) -> SparseTargets:
        """From a sparse cache's arrays as read (LogitStore.read_everything): ids widened to int64, the
        sampled logits decoded from the storage dtype."""

        def ids(name: str) -> torch.Tensor | None:
            return torch.from_numpy(extras[name].astype(np.int64)) if name in extras else None

        sampled = extras.get("sampled_logits")
        return cls(
            values=values.float(),
            ids=ids("topk_ids"),
            lse=torch.from_numpy(np.asarray(extras["lse"], dtype=np.float32)),
            temperatures=tuple(float(t) for t in entry["lse_temperatures"]),
            vocab=int(entry["vocab"]),
            sampled_ids=ids("sampled_ids"),
            sampled_logits=None if sampled is None else decode_logits(sampled, storage).float(),
        )

    def rows(self, index: torch.Tensor, device: torch.device) -> SparseTargets:
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index].to(device, non_blocking=True)

        return SparseTargets(
            take(self.values), take(self.ids), take(self.lse), self.temperatures, self.vocab,
            take(self.sampled_ids), take(self.sampled_logits),
        )  # fmt: skip

    def to(self, device: torch.device) -> SparseTargets:
        return self.rows(slice(None), device)  # type: ignore[arg-type]

    def has_temperature(self, t: float) -> bool:
        return stored_at(self.temperatures, t) is not None

    def lse_at(self, t: float) -> torch.Tensor:
        """logsumexp(z / t) of the full rows (B, L): stored, or the uniform-tail approximation."""
        i = stored_at(self.temperatures, t)
        if i is not None:
            return self.lse[..., i]
        kept = torch.logsumexp(self.values / t, -1)
        missing = self.vocab - self.values.shape[-1]
        if missing == 0:
            return kept
        u = uniform_tail_logit(self.values, self.lse[..., 0], self.temperatures[0], self.vocab)
        return torch.logaddexp(kept, math.log(missing) + u / t)


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


def kd_per_token(
    student: torch.Tensor,
    teacher: SparseTargets | torch.Tensor,
    t: float,
    target: str = "topk-tail",
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L) KD terms, times T^2: dense teacher logits (B, L, V), or a sparse target of kind `target`.
    `log_q`: the student's log_softmax(s / t), when the caller has it already."""
    if log_q is None:
        log_q = F.log_softmax(student.float() / t, dim=-1)
    if isinstance(teacher, torch.Tensor):  # dense
        log_p = F.log_softmax(teacher.float() / t, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) * t * t
    if target == "topk":
        log_p = F.log_softmax(teacher.values / t, dim=-1)
        return (log_p.exp() * (log_p - log_q.gather(-1, teacher.ids))).sum(-1) * t * t
    if target == "topk-tail":
        log_p = teacher.values / t - teacher.lse_at(t)[..., None]
        p = log_p.exp()
        kept_q = log_q.gather(-1, teacher.ids)
        kept_kl = (p * (log_p - kept_q)).sum(-1)
        if teacher.ids.shape[-1] >= teacher.vocab:  # k = V: no tail, the dense KL
            return kept_kl * t * t
        p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
        # the student's mass outside the kept ids: 1 - its kept mass (no second pass over the vocabulary;
        # clamped where the student puts all but 1e-6 of its mass on the kept tokens)
        log_q_tail = torch.log1p(-kept_q.exp().sum(-1).clamp(max=1.0 - 1e-6))
        tail = torch.xlogy(p_tail, p_tail) - p_tail * torch.where(p_tail > 0, log_q_tail, 0.0)
        return (kept_kl + tail) * t * t
    if target == "sampled":
        if teacher.sampled_ids is None or teacher.sampled_logits is None:
            raise KDError("distill.sparse_target = sampled needs a cache with samples (cache.samples > 0)")
        z = teacher.sampled_logits
        log_p_t = z / t - teacher.lse_at(t)[..., None]
        log_p_1 = z - teacher.lse_at(1.0)[..., None]
        weights = (log_p_t - log_p_1).exp()
        if not (teacher.has_temperature(t) and teacher.has_temperature(1.0)):
            weights = weights / weights.mean(-1, keepdim=True)  # self-normalised
        terms = weights * (log_p_t - log_q.gather(-1, teacher.sampled_ids))
        return terms.mean(-1) * t * t
    raise KDError(f"unknown sparse target '{target}': use {', '.join(SPARSE_TARGETS)}")


def lm_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: SparseTargets | torch.Tensor | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    target: str = "topk-tail",
) -> torch.Tensor:
    """(1 - alpha) * CE(next token) + alpha * KD, each a mean over the real tokens of the batch."""
    real = labels != PAD_LABEL
    count = real.sum().clamp(min=1)
    log_q = F.log_softmax(student.float(), dim=-1)  # one pass over the vocabulary for CE (and KD at T = 1)
    nll = -log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_q.mean(-1)
    ce = torch.where(real, nll, 0.0).sum() / count
    if teacher is None or alpha == 0.0:
        return ce
    shared = log_q if temperature == 1.0 else None
    kd = torch.where(real, kd_per_token(student, teacher, temperature, target, shared), 0.0).sum() / count
    return (1.0 - alpha) * ce + alpha * kd


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
