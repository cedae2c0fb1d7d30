"""One pass of a teacher over a split, into a cache's shards (the heart of `kd teacher-logits`): batches
never straddle a shard, so a resumed dump computes every shard exactly as an uninterrupted one (the
same bytes); dense rows, K augmented views of each row, or the sparse top-k of tokens or views, reduced
on the device; a background thread compresses and writes each shard while the teacher computes the next.
Under torchrun each rank writes `shards_of(plan, rank, world)`, so every shard has exactly one writer.
"""

from __future__ import annotations

import torch

from pipeline.data.augment import replay, view_params
from pipeline.data.datasets import Split
from pipeline.data.readers import Asks, fetch
from pipeline.models import prefers_channels_last, teacher_autocast
from pipeline.store import LogitStore, ShardWriter
from pipeline.store.sparse import reduce_logits
from pipeline.training.progress import Progress


def shards_of(plan: list[int], rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` writes: dealt round-robin, so every shard has exactly one writer."""
    return plan[rank::world]


def write_logits(
    teacher: torch.nn.Module,
    split: Split,
    store: LogitStore,
    device: torch.device,
    batch_size: int,
    *,
    shards: list[int] | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> None:
    """Run the teacher over the rows of `shards` (default: all) of `store` and write them: a background
    thread compresses and writes each shard while the teacher computes the next. Batches never straddle
    a shard, so a resumed dump computes every shard exactly as an uninterrupted one (same bytes)."""
    shards = list(range(store.num_shards)) if shards is None else shards
    channels_last = split.inputs.dim() == 4 and prefers_channels_last(teacher)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    inputs = split.inputs.pin_memory() if cuda and not split.streamed else split.inputs  # async copies
    views = store.manifest.views  # the views layout: K augmented views of every row
    sparse = store.manifest.sparse  # the sparse layout: per-token top-k, logsumexp, samples
    spec = store.augment
    writer = ShardWriter(store, shards)
    total = sum(b - a for a, b in map(store.shard_range, shards))
    part = f" ({len(shards)} of {store.num_shards} shards)" if len(shards) < store.num_shards else ""
    desc = f"teacher-logits {split.split}{part}"  # a rank's own shards, or what a resume has left
    bar = Progress(total=total, desc=desc, unit="sample", every_s=10.0, enabled=progress)
    try:
        # logits stored raw, as the teacher computed them
        with torch.inference_mode(), teacher_autocast(device, precision):
            # batches never straddle a shard; a streamed source's workers decode only these shards' rows
            bounds = [
                (start, min(start + batch_size, last))
                for first, last in map(store.shard_range, shards)
                for start in range(first, last, batch_size)
            ]
            source, plan = inputs, ((slice(a, b), (a, b)) for a, b in bounds)
            if views and spec.on_files:  # random-resized-crop: the workers draw and cut the views
                source, plan = split.view_source, ((_draws(split, views, a, b), (a, b)) for a, b in bounds)
            for x, (start, stop) in fetch(source, plan, pin=cuda):
                drawn = None
                if isinstance(x, tuple):  # (views (B, K, ...), their parameters (B, K, P))
                    x, drawn = x
                x = x.to(device, non_blocking=True)
                ids = split.ids[start:stop]
                if sparse and not views:  # tokens (B, L, V) or rows (B, C) raw, reduced on the device
                    labels = split.labels[start:stop]
                    z = teacher(x) if split.task == "sequence" else forward(teacher, x, channels_last)
                    values, extras, stats = reduce_logits(z, labels, ids, sparse)
                    writer.add(values.cpu(), labels, ids, extras=extras, stats=stats)
                elif not views:
                    logits = forward(teacher, x, channels_last)  # (B, C) raw
                    writer.add(logits, split.labels[start:stop], ids)
                else:  # K views of each row (the workers' cuts, or replayed here), the teacher on each
                    if drawn is not None:  # cut by the workers, with their parameters
                        params = drawn.numpy()  # (B, K, P)
                        cut = (x[:, k] for k in range(params.shape[1]))
                    else:  # their parameters from (view seed, sample id, view index), then replayed
                        count = "all" if views["all"] else views["count"]
                        params = view_params(spec, ids.numpy(), count, views["seed"])  # (B, K, P)
                        on_device = torch.from_numpy(params).to(device)
                        cut = (replay(x, on_device[:, k], spec) for k in range(params.shape[1]))  # lazily
                    logits = torch.stack([forward(teacher, v, channels_last) for v in cut], 1)  # (B, K, C)
                    labels = split.labels[start:stop]
                    if sparse:  # top-k of every view: the views play the part of a sequence's tokens
                        per_view = labels[:, None].expand(-1, logits.shape[1])
                        values, extras, stats = reduce_logits(logits, per_view, ids, sparse)
                        writer.add(values, labels, ids, params, extras=extras, stats=stats)
                    else:
                        writer.add(logits, labels, ids, params)
                bar.update(stop - start)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.close()


def _draws(split: Split, views: dict, start: int, stop: int) -> Asks:
    """Rows start..stop-1 asked for their K views, drawn from (view seed, sample id, view index)."""
    return Asks.draws(torch.arange(start, stop), split.ids[start:stop], views["seed"], views["count"])


def forward(teacher: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return teacher(x).float().cpu()
