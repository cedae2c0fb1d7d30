"""The sparse layout: per token of a sequence (language-model teachers), the teacher's k largest raw logits
and their token ids, the logsumexp of the *full* row at each listed temperature (so the kept tokens'
probabilities and the missing tail mass are exact there), S tokens drawn from the teacher's distribution
with their raw logits, and the label token's raw logit. Same group, manifest, shards, checksums and lock
as the dense layout:

    logits/          (N, L, k) storage dtype: the k largest raw logits of each token, largest first
    topk_ids/        (N, L, k) uint16 (vocabulary <= 65,536) | uint32: their token ids
    lse/             (N, L, T) float32: logsumexp(z / t) over the whole vocabulary, t in lse_temperatures
    sampled_ids/     (N, L, S) uint16 | uint32: S tokens drawn from softmax(z) (S = 0: no such array)
    sampled_logits/  (N, L, S) storage dtype: their raw logits (importance weights at any temperature)
    target_logit/    (N, L) float32: the raw logit of the label token (teacher perplexity, from the cache)
    labels/          (N, L) int64: the next-token targets; -100 marks padding, never trained on

The manifest's `sparse` entry holds k, the temperatures, S, the sampling seed, L and the vocabulary size;
it is part of the cache key. Each extra array has one chunk per shard, so a shard still has one writer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.errors import KDError
from pipeline.store.encoding import compressors

SPARSE_VERSION = 1
PAD_LABEL = -100  # labels at padding positions (torch's cross_entropy ignore_index)
EXTRAS = ("topk_ids", "lse", "sampled_ids", "sampled_logits", "target_logit")

__all__ = [
    "EXTRAS",
    "PAD_LABEL",
    "SPARSE_VERSION",
    "create_sparse_arrays",
    "dense_from_topk",
    "id_dtype",
    "reduce_logits",
    "sparse_lead",
    "sparse_record",
    "sparse_specs",
    "stored_at",
    "teacher_hits",
    "uniform_tail_logit",
]


def id_dtype(vocab: int) -> str:
    return "uint16" if vocab <= 65_536 else "uint32"


def sparse_record(
    k: int, lse_temperatures: Sequence[float], samples: int, seed: int, seq_len: int, vocab: int
) -> dict[str, Any]:
    """The manifest's `sparse` entry (part of the cache key); seq_len 0: classification rows."""
    if not 1 <= k <= vocab:
        raise KDError(f"cache.topk = {k} must be between 1 and the vocabulary size {vocab}")
    return {
        "k": int(k),
        "lse_temperatures": [float(t) for t in lse_temperatures],
        "samples": int(samples),
        "sample_seed": int(seed),
        "seq_len": int(seq_len),
        "vocab": int(vocab),
        "id_dtype": id_dtype(vocab),
        "version": SPARSE_VERSION,
    }


def sparse_lead(entry: Mapping[str, Any], views: int = 0) -> tuple[int, ...]:
    """The axes between a row and its k kept values: (L,) per token of a sequence, (K,) per augmented view
    of a classification row (the views layout), () for one classification row (seq_len 0)."""
    return (entry["seq_len"],) if entry["seq_len"] else (views,) if views else ()


def sparse_specs(
    entry: Mapping[str, Any], rows: int, value_dtype: str, views: int = 0
) -> dict[str, tuple[tuple, str]]:
    """{extra array: (shape, dtype)} of a sparse cache of `rows` sequences, or classification rows of
    `views` views each (sampled arrays only if S > 0)."""
    ids, s = entry["id_dtype"], entry["samples"]
    lead = (rows, *sparse_lead(entry, views))
    specs: dict[str, tuple[tuple, str]] = {
        "topk_ids": ((*lead, entry["k"]), ids),
        "lse": ((*lead, len(entry["lse_temperatures"])), "float32"),
        "target_logit": (lead, "float32"),
    }
    if s:
        specs["sampled_ids"] = ((*lead, s), ids)
        specs["sampled_logits"] = ((*lead, s), value_dtype)
    return specs


def create_sparse_arrays(
    group: zarr.Group, entry: Mapping[str, Any], rows: int, storage: Any, views: int = 0
) -> None:
    from pipeline.store.manifest import DISK_DTYPES

    for name, (shape, dtype) in sparse_specs(entry, rows, DISK_DTYPES[storage.dtype], views).items():
        chunk = (storage.shard_rows, *shape[1:])  # one chunk per shard: one writer per shard
        group.create_array(
            name,
            shape=shape,
            chunks=chunk,
            shards=chunk,
            dtype=dtype,
            compressors=compressors(storage.codec, storage.level, np.dtype(dtype).itemsize),
            fill_value=0,
        )


def _generator(seed: int, first_id: int, device: torch.device) -> torch.Generator:
    """The sampling generator of a batch: a pure function of (seed, the batch's first sample id), so a
    resumed or multi-process dump draws exactly the tokens an uninterrupted one does."""
    digest = hashlib.sha256(f"{seed}/{first_id}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def reduce_logits(
    logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, entry: Mapping[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], np.ndarray]:
    """A batch of full raw logits (B, L, V) -> (top-k values (B, L, k) float32, {extra array: tensor on
    the CPU}, per-sequence stats (B, 3): teacher-correct tokens, summed NLL at T = 1, real tokens).
    Classification rows (B, C) with labels (B,) are sequences of one: every output loses the L axis."""
    if logits.dim() == 2:
        values, extras, stats = reduce_logits(logits[:, None], labels[:, None], ids, entry)
        return values[:, 0], {name: t[:, 0] for name, t in extras.items()}, stats
    z = logits.float()
    b, length, vocab = z.shape
    values, topk = z.topk(entry["k"], dim=-1)  # sorted, largest first
    # one exp pass serves the logsumexp at T = 1 and the sampling weights (multinomial takes them
    # unnormalised); z - max <= 0, so every temperature's sum is stable without another max pass
    top = values[..., :1]
    shifted = z - top
    weights = shifted.exp()
    lse_1 = top[..., 0] + weights.sum(-1).log()
    lse = torch.stack(
        [
            lse_1 if t == 1.0 else top[..., 0] / t + (shifted / t).exp().sum(-1).log()
            for t in entry["lse_temperatures"]
        ],
        -1,
    )
    real = labels != PAD_LABEL
    safe = torch.where(real, labels, torch.zeros_like(labels)).to(z.device)
    target = z.gather(-1, safe[..., None])[..., 0]
    target = torch.where(real.to(z.device), target, torch.zeros_like(target))
    ids_dtype = torch.int32 if entry["id_dtype"] == "uint16" else torch.int64
    extras = {"topk_ids": topk.to(ids_dtype).cpu(), "lse": lse.cpu(), "target_logit": target.cpu()}
    if entry["samples"]:
        g = _generator(entry["sample_seed"], int(ids[0]), z.device)
        drawn = torch.multinomial(weights.reshape(-1, vocab), entry["samples"], replacement=True, generator=g)
        drawn = drawn.reshape(b, length, -1)
        extras["sampled_ids"] = drawn.to(ids_dtype).cpu()
        extras["sampled_logits"] = z.gather(-1, drawn).cpu()
    log_p = target - lse_1
    correct = ((topk[..., 0] == safe.to(topk.device)) & real.to(z.device)).sum(1).double()
    nll = torch.where(real.to(z.device), -log_p, torch.zeros_like(log_p)).sum(1).double()
    stats = torch.stack([correct, nll, real.sum(1).double().to(z.device)], 1).cpu().numpy()
    return values, extras, stats


def dense_from_topk(
    values: torch.Tensor, extras: Mapping[str, np.ndarray], entry: Mapping[str, Any]
) -> torch.Tensor:
    """Full logits (..., V) rebuilt from a top-k cache for methods that need every logit (classification):
    the kept logits where they were, every missing one set to the value u that keeps the tail's total
    mass at the first stored temperature exact (the uniform tail; exact for the kept probabilities and
    the tail mass at that temperature)."""
    ids = torch.from_numpy(np.asarray(extras["topk_ids"]).astype(np.int64))
    t0 = float(entry["lse_temperatures"][0])
    lse0 = torch.from_numpy(np.asarray(extras["lse"], dtype=np.float32)[..., 0])
    dense = torch.empty((*values.shape[:-1], int(entry["vocab"])), dtype=torch.float32)
    if int(entry["vocab"]) > values.shape[-1]:
        dense[:] = uniform_tail_logit(values.float(), lse0, t0, int(entry["vocab"]))[..., None]
    return dense.scatter_(-1, ids, values.float())


def uniform_tail_logit(values: torch.Tensor, lse0: torch.Tensor, t0: float, vocab: int) -> torch.Tensor:
    """The one logit u every missing (not kept) token is taken to have so that, at temperature t0, the
    V - k missing tokens hold exactly the tail mass the stored logsumexp lse0 leaves (V > k)."""
    missing = vocab - values.shape[-1]
    gap = (torch.logsumexp(values / t0, -1) - lse0).clamp(max=-1e-7)  # log(kept mass at t0) < 0
    tail0 = lse0 + torch.log1p(-torch.exp(gap))  # log of the tail's mass at t0
    return t0 * (tail0 - math.log(missing))


def stored_at(temperatures: Sequence[float], t: float) -> int | None:
    """The index of temperature t among a cache's lse_temperatures (None: no full logsumexp stored there)."""
    return next((i for i, s in enumerate(temperatures) if abs(t - s) < 1e-6), None)


def teacher_hits(topk_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many of its positions (tokens, views, or the row itself) have the label as the
    teacher's top id, and how many are real (not padding). Labels (N,) or (N, L); ids (N, ..., k)."""
    top = np.asarray(topk_ids)[..., 0].astype(np.int64).reshape(len(topk_ids), -1)
    wanted = np.broadcast_to(np.asarray(labels).reshape(len(labels), -1), top.shape)
    real = wanted != PAD_LABEL
    return ((top == wanted) & real).sum(1), real.sum(1)
