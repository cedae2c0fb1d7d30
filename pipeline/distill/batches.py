"""Training batches that join dataset rows with cached teacher logits by sample id.

Small caches are read once into memory (any order is then free); large ones stream chunk-shuffled
(whole chunks in random order, rows shuffled within a buffer) — never scattered row reads.

The student's augmentation happens here, on the global batch, so every DDP rank sees the views one
process would: with a view cache, each row gets one of its stored views (random or cycled per epoch),
the input replayed from the view's parameters and the target that view's logits; without one, fresh
views are drawn from the data-order generator (the target then stays the fixed view's: a mismatch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pipeline.data.augment import AugmentSpec, replay
from pipeline.data.datasets import Split
from pipeline.data.readers import Asks, fetch
from pipeline.errors import KDError
from pipeline.models import teacher_autocast
from pipeline.store import LogitStore
from pipeline.store.reader import Buffer
from pipeline.store.sparse import dense_from_topk


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, ...)
    labels: torch.Tensor  # (B,)
    teacher_logits: torch.Tensor | None  # (B, C) raw, float32; None for label-only methods
    augmented: bool = False  # inputs are already the student's views (the loop must not augment again)
    scale: float = (
        1.0  # on the loss's gradient: under DDP, a rank's share of a token batch (pipeline.distill.lm)
    )


@dataclass(frozen=True)
class Views:
    """The student's augmentation for a batch source: stored views to replay, or fresh ones."""

    spec: AugmentSpec = AugmentSpec()  # kind "none": the inputs as they are
    params: torch.Tensor | None = None  # (N, K, P) stored views' parameters, dataset row order; None: fresh
    choice: str = "random"  # with stored views: random | cycle (view (epoch + offset_i) mod K)
    seed: int = 0  # of the cycle offsets

    @property
    def stored(self) -> bool:
        return self.params is not None

    def picker(self, count: int, num_rows: int) -> ViewPicker:
        return ViewPicker(self.choice, count, num_rows, self.seed)

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """Every view's parameters (space, P), built once, not per batch."""
        return torch.from_numpy(self.spec.enumerate())

    def fresh(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, P) parameters drawn uniformly over the views, from the data-order generator."""
        return self.table[torch.randint(0, self.spec.space, (batch,), generator=generator)]


class ViewPicker:
    """Which of its K stored views a row gets in an epoch: `random` draws one per row from the data-order
    generator; `cycle` walks them, view (epoch + offset_i) mod K, with a fixed random offset per row."""

    def __init__(self, choice: str, count: int, num_rows: int, seed: int) -> None:
        self.choice, self.count = choice, count
        self.offsets = torch.randint(0, count, (num_rows,), generator=torch.Generator().manual_seed(seed))

    def __call__(self, rows: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The view index (B,) of each dataset row in `rows` (a global batch) this epoch."""
        if self.choice == "cycle":
            return (epoch + self.offsets[rows.cpu()]) % self.count
        return torch.randint(0, self.count, (len(rows),), generator=generator)


T = TypeVar("T")


def positions_of(query_ids: torch.Tensor, dataset_ids: torch.Tensor) -> torch.Tensor:
    """Row position in the dataset of each query id; a KDError if any id is not in the dataset."""
    order = torch.argsort(dataset_ids)
    sorted_ids = dataset_ids[order]
    at = torch.searchsorted(sorted_ids, query_ids).clamp_(max=len(sorted_ids) - 1)
    missing = sorted_ids[at] != query_ids
    if missing.any():
        raise KDError(
            f"{int(missing.sum())} cached sample ids are not in the dataset "
            f"(first: {int(query_ids[missing][0])}): "
            "the cache was made on other data; re-run `kd teacher-logits`"
        )
    return order[at]


class InMemoryBatches:
    """Everything on the device once (a streamed source's inputs excepted: its workers decode each
    batch's rows ahead); each epoch draws a fresh permutation of the training rows."""

    def __init__(
        self,
        split: Split,
        rows: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
        views: Views | None = None,
    ) -> None:
        """teacher_logits: (N, C), or (N, K, C) with stored views (`views.params`), in dataset row order."""
        self.device, self.ids = device, split.ids
        self.views = views or Views()
        # random-resized-crop: every view is cut from the image files by the workers
        self.files = split.view_source if self.views.spec.on_files else None
        held = split.streamed or self.files is not None
        self.inputs = split.inputs if held else split.inputs.to(device)
        self.labels = split.labels.to(device)
        self.teacher_logits = None if teacher_logits is None else teacher_logits.to(device)
        self.rows = rows.to(device)
        self.batch_size = batch_size
        if self.views.params is not None:
            self.views = dataclasses.replace(self.views, params=self.views.params.to(device))
        stored = self.views.params is not None
        self.picker = self.views.picker(self.views.params.shape[1], len(split)) if stored else None
        self.rank, self.world = 0, 1
        self.epochs_done = 0

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: every rank walks the same global batches and takes rows rank, rank + world, ..."""
        self.rank, self.world = rank, world

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        pin, source, plans = self.device.type == "cuda", self.inputs, self._plans(generator)
        if self.files is not None:
            source, plans = self.files, asking_views(plans, self.ids, generator)
        for inputs, (idx, zt, params) in fetch_views(source, plans, pin=pin):
            inputs = inputs.to(self.device, non_blocking=True)
            if params is not None and self.files is None:  # cut views come cut from the workers
                inputs = replay(inputs, params, self.views.spec)
            yield Batch(inputs, self.labels[idx], zt, params is not None or self.files is not None)

    def _plans(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, tuple[Any, ...]]]:
        """(rows of this rank, (rows, teacher logits, view parameters or None)) of each batch, in order:
        every draw from `generator` happens here, so prefetching does not change them."""
        epoch, self.epochs_done = self.epochs_done, self.epochs_done + 1
        order = self.rows[torch.randperm(len(self.rows), generator=generator).to(self.rows.device)]
        views, device = self.views, self.rows.device
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]  # the global batch: views are drawn for all of it
            if self.picker is not None:
                assert views.params is not None and self.teacher_logits is not None
                pick = self.picker(rows, epoch, generator).to(device)
                rows, pick = rows[self.rank :: self.world], pick[self.rank :: self.world]
                yield rows, (rows, self.teacher_logits[rows, pick], views.params[rows, pick])
                continue
            fresh = views.spec.kind != "none" and not views.spec.on_files  # else: drawn by the workers
            params = views.fresh(len(rows), generator) if fresh else None
            idx = rows[self.rank :: self.world]
            zt = None if self.teacher_logits is None else self.teacher_logits[idx]
            mine = None if params is None else params[self.rank :: self.world].to(device)
            yield idx, (idx, zt, mine)


def asking_views(
    plans: Iterable[tuple[torch.Tensor, tuple[Any, ...]]], ids: torch.Tensor, generator: torch.Generator
) -> Iterator[tuple[Asks, tuple[Any, ...]]]:
    """Plans (rows, (rows, targets, view parameters or None)) whose rows ask the image files for their
    views (random-resized-crop): a stored view replayed from its parameters, or, without them, a fresh
    view drawn from (a seed from `generator`, the sample id), the same on every rank."""
    for rows, extra in plans:
        params = extra[2]
        if params is not None:
            yield Asks(rows, [("view", tuple(p)) for p in params.tolist()]), extra
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            yield Asks.draws(rows, ids[rows.cpu()], seed, 1), extra


def fetch_views(
    source: Any, plans: Iterable[tuple[Any, T]], *, pin: bool
) -> Iterator[tuple[torch.Tensor, T]]:
    """readers.fetch, with a fresh view drawn by the workers ((views (B, 1, ...), params)) taken as the
    batch's inputs."""
    for inputs, extra in fetch(source, plans, pin=pin):
        yield (inputs[0][:, 0] if isinstance(inputs, tuple) else inputs), extra


def cached_logits_for(store: LogitStore, split: Split) -> torch.Tensor:
    """The whole cache read into memory and reordered to the dataset's row order: (N, C) float32, or
    (N, K, C) for a view cache."""
    logits, _, ids, extras = store.read_everything()
    if store.manifest.sparse:  # a top-k cache: every logit, the missing ones from the uniform tail
        logits = dense_from_topk(logits, extras, store.manifest.sparse)
    aligned = torch.empty_like(logits)
    aligned[positions_of(ids, split.ids)] = logits
    return aligned


def cached_views_for(store: LogitStore, split: Split) -> torch.Tensor | None:
    """A view cache's parameters (N, K, P) in the dataset's row order (read_all checked them), or None."""
    params = store.read_views()
    if params is None:
        return None
    aligned = torch.empty(params.shape, dtype=torch.int16)
    aligned[positions_of(store.ids, split.ids)] = torch.from_numpy(params)
    return aligned


def cut_batches(
    parts: Iterable[tuple[torch.Tensor, Callable[[int, int], T]]],
    batch_size: int,
    join: Callable[[T, T], T],
) -> Iterator[tuple[torch.Tensor, T]]:
    """Batches of `batch_size` rows from a stream of parts, each (the dataset positions of its rows,
    take(a, b): the targets of its rows a..b-1, gathered only when asked), as (positions, targets):
    each batch's targets are gathered for it alone (never a copy of a whole part), the rows left at the
    end of a part go first into the next part's first batch, and the last batch is partial."""
    carry_pos: torch.Tensor | None = None
    carry: T | None = None
    for new_pos, take in parts:
        held = 0 if carry_pos is None else len(carry_pos)  # rows carried over, fewer than a batch
        pos = new_pos if carry_pos is None else torch.cat([carry_pos, new_pos])
        full = len(pos) - len(pos) % batch_size
        for start in range(0, full, batch_size):
            got = take(max(start, held) - held, start + batch_size - held)
            yield pos[start : start + batch_size], join(carry, got) if start < held else got  # type: ignore[arg-type]
        rest = take(max(full, held) - held, len(pos) - held)
        carry, carry_pos = (join(carry, rest) if full < held else rest), pos[full:]  # type: ignore[arg-type]
    if carry_pos is not None and len(carry_pos):
        yield carry_pos, carry  # type: ignore[misc]


class ShardStream:
    """Batches from a store too big for memory, read shard by shard (LogitStore.iter_buffers); rows
    outside `rows` are skipped. Subclasses make the batches (`_epoch`).

    Under DDP the shards are partitioned: each epoch's shuffled shard order is dealt round-robin across
    the W ranks, so every shard is read once per epoch in all (not once per rank). Each rank makes
    batches of batch_size / W rows from its own shards, and every rank stops after the same number of
    batches: the smallest rank's rows // (batch_size / W), computable on every rank without talking;
    the rows past it (under a shard's worth per rank) sit this epoch out, and shards are reshuffled the
    next. The global batch is still batch_size rows, but not the rows one process would draw."""

    def __init__(
        self, store: LogitStore, split_ids: torch.Tensor, rows: torch.Tensor, batch_size: int
    ) -> None:
        self.store, self.split_ids, self.batch_size = store, split_ids, batch_size
        self.keep = torch.zeros(len(split_ids), dtype=torch.bool)
        self.keep[rows] = True
        self.rank, self.world = 0, 1
        # kept (training) rows of each shard, in the store's order: what each rank's share holds
        kept = self.keep[positions_of(store.ids, split_ids)]
        self.kept_per_shard = [
            int(kept[a:b].sum()) for a, b in map(store.shard_range, range(store.num_shards))
        ]

    def shard(self, rank: int, world: int) -> None:
        """Under DDP: each rank reads its own shards of every epoch (see the class docstring)."""
        if world > 1 and self.batch_size % world:
            raise KDError(
                f"distill.train.batch_size ({self.batch_size}) must be a multiple of the {world} processes "
                "when a cache is streamed: each process takes an equal share of the global batch"
            )
        if world > self.store.num_shards:  # a process with no shard would train on nothing, silently
            raise KDError(
                f"cache {self.store.where} has {self.store.num_shards} shard(s) but {world} processes stream "
                "it, and each reads whole shards: hold it in memory (raise distill.memory_budget_mb), run "
                "fewer processes, or rebuild it with smaller shards (kd teacher-logits --force --set "
                "cache.shard_chunks=1)"
            )
        self.rank, self.world = rank, world

    def epoch(self, generator: torch.Generator) -> Iterator[Any]:
        if self.world == 1:
            yield from self._epoch(generator, self.batch_size, None)
            return
        # one draw from the shared generator (equal on every rank): this epoch's shard order; the
        # rank's own shuffles and view picks then use a generator of its own
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        order = torch.randperm(self.store.num_shards, generator=torch.Generator().manual_seed(seed)).tolist()
        shares = [order[r :: self.world] for r in range(self.world)]
        local = self.batch_size // self.world
        limit = min(sum(self.kept_per_shard[i] for i in share) for share in shares) // local
        if limit == 0:  # every rank computes the same limit: all stop here together
            raise KDError(
                f"cache {self.store.where}: a process's shards hold fewer than {local} training rows this "
                f"epoch (its share of a batch of {self.batch_size}): hold the cache in memory (raise "
                "distill.memory_budget_mb) or rebuild it with smaller shards (--set cache.shard_chunks=1)"
            )
        mine = torch.Generator().manual_seed(seed + 1 + self.rank)
        batches = self._epoch(mine, local, shares[self.rank])
        for _, batch in zip(range(limit), batches, strict=False):
            yield batch
        batches.close()

    def _epoch(self, generator: torch.Generator, batch_size: int, shards: list[int] | None) -> Iterator[Any]:
        """Batches of `batch_size` kept rows from `shards` (None: all, in an order drawn from
        `generator`), the last one partial."""
        raise NotImplementedError


class StreamedBatches(ShardStream):
    """Classification batches from a streamed cache (see ShardStream): inputs fetched by sample id, a view
    cache's stored view replayed, a top-k cache rebuilt to every class block by block."""

    def __init__(
        self,
        store: LogitStore,
        split: Split,
        rows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        buffer_blocks: int = 4,
        views: Views | None = None,
    ) -> None:
        super().__init__(store, split.ids, rows, batch_size)
        self.split, self.device, self.buffer_blocks = split, device, buffer_blocks
        self.views = views or Views()  # params unused: a streamed view cache brings its own
        self.picker: ViewPicker | None = None
        self.epochs_done = 0

    def _epoch(
        self,
        generator: torch.Generator,
        batch_size: int,
        shards: list[int] | None,
    ) -> Iterator[Batch]:
        """Batches of `batch_size` kept rows from `shards` (None: all, in an order drawn from
        `generator`, which also shuffles rows and picks views), the last one partial."""
        epoch, self.epochs_done = self.epochs_done, self.epochs_done + 1
        stored = bool(self.store.manifest.views)
        if stored and self.picker is None:
            self.picker = self.views.picker(self.store.num_views, len(self.split))
        spec = self.store.augment if stored else self.views.spec

        def parts() -> Iterator[tuple[torch.Tensor, Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]]]:
            for buffer in self.store.iter_buffers(generator, buffer_blocks=self.buffer_blocks, shards=shards):
                pos = positions_of(buffer.ids[buffer.order], self.split.ids)
                keep = self.keep[pos]
                rows, pos = buffer.order[keep], pos[keep]  # the buffer's kept rows, in shuffled order
                pick = None
                if "views" in buffer.extras and self.picker is not None:  # one stored view per row: its
                    pick = self.picker(pos, epoch, generator)  # logits and the parameters that replay it
                    params = torch.from_numpy(buffer.extras["views"])[rows, pick]
                elif spec.kind != "none" and not spec.on_files:
                    params = self.views.fresh(len(pos), generator)
                else:
                    params = torch.empty(len(pos), 0, dtype=torch.int16)
                yield pos, functools.partial(self._targets, buffer, rows, pick, params.to(torch.int16))

        def join(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(torch.cat(pair) for pair in zip(a, b, strict=True))

        plans: Iterable[tuple[Any, tuple[Any, ...]]]
        plans = ((pos, (pos, zt, params)) for pos, (zt, params) in cut_batches(parts(), batch_size, join))
        source = self.split.inputs
        if spec.on_files:  # random-resized-crop: the workers cut the views from the image files
            fresh = ((rows, (rows, zt, p if p.shape[1] else None)) for rows, (_, zt, p) in plans)
            source, plans = self.split.view_source, asking_views(fresh, self.split.ids, generator)
        for inputs, (pos, zt, params) in fetch_views(source, plans, pin=self.device.type == "cuda"):
            yield self._batch(inputs, pos, zt, params, spec)

    def _targets(
        self, buffer: Buffer, rows: torch.Tensor, pick: Any, params: torch.Tensor, a: int, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 (b - a, C) targets, view parameters) of a buffer's kept rows a..b-1: a top-k cache
        rebuilt to every class, then the picked view."""
        at = rows[a:b]
        values = buffer.values[at]
        if self.store.manifest.sparse:
            held = {name: buffer.extras[name][at.numpy()] for name in ("topk_ids", "lse")}
            values = dense_from_topk(values, held, self.store.manifest.sparse)
        return (values if pick is None else values[torch.arange(b - a), pick[a:b]]), params[a:b]

    def _batch(
        self,
        inputs: torch.Tensor,
        pos: torch.Tensor,
        zt: torch.Tensor,
        params: torch.Tensor,
        spec: AugmentSpec,
    ) -> Batch:
        parts = (inputs, self.split.labels[pos], zt)
        if self.device.type == "cuda":  # pinned host memory: the copies run asynchronously
            parts = tuple(p if p.is_pinned() else p.pin_memory() for p in parts)
        inputs, labels, logits = (p.to(self.device, non_blocking=True) for p in parts)
        return Batch(inputs if spec.on_files else replay(inputs, params, spec), labels, logits, True)


class OnlineBatches:
    """Online KD: the teacher runs on each (augmented) batch of `base`, so its targets are always those
    of the student's views; the reference a view cache is measured against."""

    def __init__(self, base: InMemoryBatches, teacher: torch.nn.Module, precision: str = "fp32") -> None:
        self.base, self.teacher, self.precision = base, teacher, precision  # precision: as cache.precision

    def shard(self, rank: int, world: int) -> None:
        self.base.shard(rank, world)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        for batch in self.base.epoch(generator):
            # not inference_mode: the targets enter the student's autograd graph
            with torch.no_grad(), teacher_autocast(batch.inputs.device, self.precision):
                logits = self.teacher(batch.inputs).float()
            yield Batch(batch.inputs, batch.labels, logits, True)
