"""The public reader of a logit cache: what `kd distill` runs, and what your own training loop calls.

    import pipeline
    cache = pipeline.open_cache("data/logits/<name>.zarr")   # a folder, .zip, file:// or s3:// URL
    cache.check(ids=my_ids, labels=my_labels)                # the data checks `kd distill` makes
    teacher = cache.targets(batch_ids, device="cuda")        # (B, C) float32 raw logits, in that order
    for ids, teacher in cache.stream(batch_size=256, seed=0, epoch=e):   # caches bigger than memory
        ...

Opening makes the checks `kd distill` makes before its first batch (complete, every shard done, shapes
as the manifest says); every read is checked against the shards' CRC32C and refuses NaN/Inf. A cache
that fits `memory_budget_mb` (as float32) is read whole once, on the first `targets` call; a bigger one
reads the shards that hold the ids asked for (a few kept in memory), and `stream` serves it in
shuffled shard order without scattered reads.

What `targets` gives, by layout: dense, (n, C) float32 raw logits; views, `ViewTargets` (the logits and
replay parameters of every view, or of the view asked for of each row); sparse token sequences,
`pipeline.SparseTargets` (top-k values and ids, logsumexps, samples); a top-k cache of classes, the
(n, C) logits rebuilt as `kd distill` rebuilds them (the uniform tail).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.distill.batches import ShardStream, cut_batches
from pipeline.errors import KDError
from pipeline.store import LogitStore, Manifest
from pipeline.store.encoding import decode_logits
from pipeline.store.sparse import dense_from_topk

if TYPE_CHECKING:
    from pipeline.data.augment import AugmentSpec
    from pipeline.data.datasets import Split

IdsLike = torch.Tensor | np.ndarray | Sequence[int]
MEMORY_BUDGET_MB = 2048  # as `distill.memory_budget_mb`: caches up to this size (float32) are held whole
KEPT_SHARDS = 4  # shards a cache bigger than memory keeps decoded for `targets`


@dataclasses.dataclass(frozen=True)
class ViewTargets:
    """The teacher side of rows of a views cache: raw logits and the parameters that replay each view on
    the row's input (`pipeline.data.augment.replay(inputs, params, cache.augment)`)."""

    logits: torch.Tensor  # (n, K, C) every view, or (n, C) the view asked for of each row
    params: torch.Tensor  # (n, K, P) int16, or (n, P)

    def to(self, device: torch.device | str) -> ViewTargets:
        return ViewTargets(self.logits.to(device), self.params.to(device))


def open_cache(
    location: str | Path,
    *,
    memory_budget_mb: int = MEMORY_BUDGET_MB,
    data_dir: str | Path = "data",
    remote_cache_mb: int = 4096,
) -> Cache:
    """Open a complete cache: a folder, a `.zip`, a `file://` URL or an fsspec URL (`s3://...`, read
    through local copies under `data_dir/remote-cache/` that are fetched again when they fail a check).
    A `KDError` (one line: what is wrong, what to do) when it is incomplete, damaged or no cache."""
    from pipeline.backends import is_url

    if isinstance(location, Cache):  # already open
        return location
    if is_url(location):
        from pipeline.config import Paths
        from pipeline.far_cache import open_far_cache

        store = open_far_cache(
            str(location),
            Paths(data=Path(data_dir)),
            memory_budget_mb=memory_budget_mb,
            remote_cache_mb=remote_cache_mb,
        )
    else:
        store = LogitStore.open(location)
    store.require_complete()
    return Cache(store, memory_budget_mb=memory_budget_mb)


class Cache:
    """A complete logit cache opened for reading (see the module docstring)."""

    def __init__(self, store: LogitStore, *, memory_budget_mb: int = MEMORY_BUDGET_MB) -> None:
        self.store = store
        self.memory_budget_mb = memory_budget_mb
        self._whole: Any = None  # every row's targets, in the store's order, once read
        self._shards: OrderedDict[int, Any] = OrderedDict()  # decoded shards (a cache bigger than memory)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable, so DataLoader workers can read it under spawn or forkserver as under fork: what is
        held whole goes along (torch shares it with the workers), the kept shards do not."""
        return {**self.__dict__, "_shards": OrderedDict()}

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Cache({self.where!r}: {m.layout}, teacher {m.teacher.name}, "
            f"{m.dataset.name}/{m.dataset.split}, {len(self)} rows x {self.num_classes} classes)"
        )

    def __len__(self) -> int:
        return self.store.num_rows

    @property
    def where(self) -> str:
        return self.store.where

    @property
    def manifest(self) -> Manifest:
        """Which teacher, which data, which preprocessing and storage (pipeline.store.manifest)."""
        return self.store.manifest

    @property
    def layout(self) -> str:
        """dense, views or sparse."""
        return self.manifest.layout

    @property
    def num_classes(self) -> int:
        """Classes, or the vocabulary of a language-model cache."""
        return self.store.num_classes

    @property
    def ids(self) -> torch.Tensor:
        """(N,) int64 sample ids, in the store's order: the join key with your data."""
        return self.store.ids

    @property
    def augment(self) -> AugmentSpec:
        """The augmentation a views cache's parameters replay (kind "none" for the other layouts)."""
        return self.store.augment

    @property
    def fits_in_memory(self) -> bool:
        return self.store.memory_bytes() <= self.memory_budget_mb * 2**20

    # -- checks ----------------------------------------------------------------------------------------
    def check(
        self,
        split: Split | None = None,
        *,
        ids: IdsLike | None = None,
        labels: IdsLike | None = None,
        num_classes: int | None = None,
        fingerprint: str | None = None,
        split_name: str | None = None,
    ) -> None:
        """Refuse a cache computed on other data, in one line naming the mismatch. A `Split` (kd's own
        datasets) is checked as `kd distill` checks it: split, length, fingerprint, sequence length,
        tokenizer and class count. For your own data, give what you have: every id must be cached; the
        labels (of those ids, in their order) must be the cache's; the class count, the dataset
        fingerprint (`cache.manifest.dataset.fingerprint`) and split name must agree."""
        if split is not None:
            check_matches(self.store, split)
        d, fix = self.manifest.dataset, "use the cache made from this data, or run `kd teacher-logits` on it"
        if split_name is not None and d.split != split_name:
            raise KDError(f"cache {self.where} holds the '{d.split}' split, not '{split_name}': {fix}")
        if num_classes is not None and num_classes != self.num_classes:
            raise KDError(
                f"cache {self.where} has {self.num_classes} classes, your data {num_classes}: {fix}"
            )
        if fingerprint is not None and fingerprint != d.fingerprint:
            raise KDError(
                f"cache {self.where} was computed on other data (fingerprint {d.fingerprint[:12]} != "
                f"{fingerprint[:12]}): {fix}"
            )
        if ids is None:
            if labels is not None:
                raise KDError("cache.check(labels=...) needs the ids the labels belong to (ids=...)")
            return
        at = self.positions(ids)
        if labels is not None:
            theirs = _as_ids(labels, "labels", flat=False)
            ours = torch.from_numpy(self.store.read("labels"))[at]
            if theirs.shape != ours.shape:
                raise KDError(
                    f"cache.check: labels of shape {tuple(theirs.shape)} for {len(at)} ids (this cache holds "
                    f"labels of shape {tuple(ours.shape)[1:]} a row)"
                )
            wrong = (theirs != ours).reshape(len(at), -1).any(-1)
            if wrong.any():
                first = int(_as_ids(ids)[wrong][0])
                raise KDError(
                    f"cache {self.where}: {int(wrong.sum())} of {len(at)} labels differ from the cached ones "
                    f"(first at sample id {first}): the ids do not name the rows the teacher saw; {fix}"
                )

    def positions(self, ids: IdsLike) -> torch.Tensor:
        """Row position in the store of each sample id; a KDError naming the ids that are not cached."""
        query = _as_ids(ids)
        stored = self.ids
        order = torch.argsort(stored)
        sorted_ids = stored[order]
        if len(sorted_ids) == 0:
            raise KDError(f"cache {self.where} holds no rows")
        at = torch.searchsorted(sorted_ids, query).clamp_(max=len(sorted_ids) - 1)
        missing = sorted_ids[at] != query
        if missing.any():
            shown = ", ".join(str(int(i)) for i in query[missing][:5])
            count = int(missing.sum())
            more = f" and {count - 5} more" if count > 5 else ""
            what = f"sample id {shown} is" if count == 1 else f"sample ids {shown}{more} are"
            raise KDError(
                f"{what} not in cache {self.where} ({len(stored)} rows of "
                f"{self.manifest.dataset.name}/{self.manifest.dataset.split}): is it the cache of this data?"
            )
        return order[at]

    # -- reading ---------------------------------------------------------------------------------------
    def targets(
        self, ids: IdsLike, *, view: IdsLike | None = None, device: torch.device | str | None = None
    ) -> Any:
        """The teacher side of these sample ids, in their order (see the module docstring for what each
        layout gives). `view`: for a views cache, the view index of each row (default: every view)."""
        at = self.positions(ids)
        if self.fits_in_memory:
            whole = self._read_whole()
            held = _take(whole, at)
        else:
            held = self._from_shards(at)
        if view is not None:
            if not isinstance(held, ViewTargets):
                raise KDError(f"cache {self.where} has no views (layout {self.layout}): drop view=...")
            pick = _as_ids(view, "view")
            if len(pick) != len(at) or bool(((pick < 0) | (pick >= self.store.num_views)).any()):
                raise KDError(
                    f"view=...: one view index a row, each in 0..{self.store.num_views - 1} "
                    f"({self.store.num_views} views a row in this cache)"
                )
            rows = torch.arange(len(at))
            held = ViewTargets(held.logits[rows, pick], held.params[rows, pick])
        return held if device is None else held.to(device)

    def stream(
        self,
        *,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """Every row once, as (sample ids (b,), their targets) batches of `batch_size` (the last one
        partial): whole shards in an order drawn from (seed, epoch), rows shuffled within buffers of
        shards, each shard checked against its CRC32C as it loads. Under torch.distributed give `rank`
        and `world_size` (of the same seed and epoch): the shards are dealt round-robin, each rank reads
        only its own, and every rank yields the same number of batches of batch_size / world_size rows
        (`kd distill`'s streaming; rows past the smallest share sit the epoch out)."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise KDError(f"cache.stream: batch_size must be a whole number of rows >= 1, not {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)):
            raise KDError(
                f"cache.stream: world_size must be >= 1 and rank a whole number, not {world_size!r}, {rank!r}"
            )
        if not 0 <= rank < world_size:
            raise KDError(
                f"cache.stream: rank {rank} is not one of the {world_size} processes (0..{world_size - 1})"
            )
        if world_size > 1 and batch_size % world_size:
            raise KDError(
                f"cache.stream: batch_size ({batch_size}) must be a multiple of world_size ({world_size}): "
                "each process takes an equal share of the global batch"
            )
        shards = self.store.num_shards
        if world_size > 1 and shards < world_size:
            raise KDError(
                f"cache.stream: this cache has {shards} shard(s), fewer than the {world_size} processes, and "
                "streaming deals whole shards to processes, so some would get no rows: read it with "
                "cache.targets(ids) for the ids of a DistributedSampler, or write it with more shards "
                "(a smaller cache.shard_rows)"
            )
        stream = _IdStream(self, batch_size)
        if world_size > 1:
            stream.shard(rank, world_size)
        return stream.epoch(torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch)))

    def _read_whole(self) -> Any:
        if self._whole is None:
            logits, _, _, extras = self.store.read_everything()  # every shard checked, NaN/Inf refused
            self._whole = self._wrap(logits, extras)
        return self._whole

    def _from_shards(self, at: torch.Tensor) -> Any:
        """Rows `at` of a cache bigger than memory: the shards holding them read (checked) and kept."""
        shard_of = torch.div(at, self.store.shard_rows, rounding_mode="floor")
        parts, where = [], torch.empty(len(at), dtype=torch.int64)
        offset = 0
        for shard in torch.unique(shard_of).tolist():
            mine = torch.nonzero(shard_of == shard).flatten()
            held = self._shard(shard)
            parts.append(_take(held, at[mine] - shard * self.store.shard_rows))
            where[mine] = torch.arange(offset, offset + len(mine))
            offset += len(mine)
        joined = _join(parts)
        return _take(joined, where)

    def _shard(self, shard: int) -> Any:
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        raw, _, extras = self.store.read_shard(shard)
        a, b = self.store.shard_range(shard)
        self.store.refuse_nonfinite(raw, self.ids[a:b])
        held = self._wrap(decode_logits(raw, self.manifest.storage.dtype), extras)
        self._shards[shard] = held
        while len(self._shards) > KEPT_SHARDS:
            self._shards.popitem(last=False)
        return held

    def _wrap(self, logits: torch.Tensor, extras: dict[str, np.ndarray]) -> Any:
        """Stored rows as this layout's targets."""
        m = self.manifest
        if m.task == "sequence":
            from pipeline.distill.targets import SparseTargets

            return SparseTargets.from_arrays(logits, extras, m.sparse, m.storage.dtype)
        if m.sparse:  # a top-k cache of classes: every logit, as kd distill rebuilds them
            logits = dense_from_topk(logits, extras, m.sparse)
        if m.views:
            return ViewTargets(logits.float(), torch.from_numpy(np.asarray(extras["views"])))
        return logits.float()


class _IdStream(ShardStream):
    """Cache.stream's batches: kd distill's shard stream over every row, yielding (ids, targets)."""

    def __init__(self, cache: Cache, batch_size: int) -> None:
        super().__init__(cache.store, cache.ids, torch.arange(len(cache)), batch_size)
        self.cache = cache

    def _epoch(
        self, generator: torch.Generator, batch_size: int, shards: list[int] | None
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        def parts() -> Iterator[tuple[torch.Tensor, Callable[[int, int], Any]]]:
            for buffer in self.store.iter_buffers(generator, shards=shards):
                held = self.cache._wrap(buffer.values, buffer.extras)
                yield buffer.ids[buffer.order], functools.partial(_take_range, held, buffer.order)

        yield from cut_batches(parts(), batch_size, lambda a, b: _join([a, b]))


def _take_range(held: Any, order: torch.Tensor, a: int, b: int) -> Any:
    return _take(held, order[a:b])


def _take(held: Any, at: torch.Tensor) -> Any:
    """Rows `at` of a layout's targets."""
    if isinstance(held, torch.Tensor):
        return held[at]
    if isinstance(held, ViewTargets):
        return ViewTargets(held.logits[at], held.params[at])
    return held.rows(at, held.values.device)  # SparseTargets


def _join(parts: list[Any]) -> Any:
    """Rows of several parts of a layout's targets, one after the other."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, ViewTargets):
        return ViewTargets(torch.cat([p.logits for p in parts]), torch.cat([p.params for p in parts]))

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return dataclasses.replace(
        first, **{n: cat(n) for n in ("values", "ids", "lse", "sampled_ids", "sampled_logits")}
    )


def _as_ids(ids: IdsLike, what: str = "sample ids", flat: bool = True) -> torch.Tensor:
    """Whole numbers as an int64 tensor ((n,) when `flat`); a KDError for floats (they would be cut to
    whole numbers silently) and, when `flat`, for any other shape."""
    if isinstance(ids, torch.Tensor):
        held: Any = ids.detach().cpu()
        whole = not (held.is_floating_point() or held.is_complex() or held.dtype == torch.bool)
    else:
        held = np.asarray(ids)
        whole = held.dtype.kind in "iu" or held.size == 0
    if not whole:
        kind = str(held.dtype).removeprefix("torch.")
        raise KDError(f"{what} must be whole numbers (an integer tensor, array or list), not {kind}")
    if flat and held.ndim != 1:
        raise KDError(f"{what} must be a 1-D sequence, one a row, not of shape {tuple(held.shape)}")
    if isinstance(held, torch.Tensor):
        return held.to(torch.int64)
    return torch.from_numpy(held.astype(np.int64))


def check_matches(store: LogitStore, split: Split) -> None:
    """Refuse a cache computed on other data: split, length, fingerprint and class count must agree."""
    d = store.manifest.dataset
    fix = "re-run `kd teacher-logits` for this dataset, or use its cache (--cache PATH, open_cache(PATH))"
    if d.split != split.split:
        raise KDError(f"cache {store.where} holds the '{d.split}' split, not '{split.split}': {fix}")
    if d.length != len(split) or store.num_rows != len(split):
        raise KDError(
            f"cache {store.where} has {d.length} rows but the {split.dataset} {split.split} split has "
            f"{len(split)}: {fix}"
        )
    cached_length, length = store.manifest.preprocessing.get("seq_len"), split.preprocessing.get("seq_len")
    if cached_length != length:
        raise KDError(
            f"cache {store.where} holds sequences of {cached_length} tokens but dataset.options.seq_len is "
            f"{length}: use the cache's sequence length, or re-run `kd teacher-logits` with this one"
        )
    for key in ("tokenizer", "tokenizer_fingerprint", "max_length"):
        cached, current = store.manifest.preprocessing.get(key), split.preprocessing.get(key)
        if cached != current:
            raise KDError(
                f"cache {store.where} was tokenized with {key} {cached!r}, this dataset uses {current!r}: "
                "use the same tokenizer and max length, or re-run `kd teacher-logits`"
            )
    if d.fingerprint != split.fingerprint:
        raise KDError(
            f"cache {store.where} was computed on different data (fingerprint {d.fingerprint[:12]} != "
            f"{split.fingerprint[:12]} of {split.dataset}/{split.split}): {fix}"
        )
    if store.num_classes != split.num_classes:
        raise KDError(
            f"cache {store.where} has {store.num_classes} classes but {split.dataset} has "
            f"{split.num_classes}: {fix}"
        )
