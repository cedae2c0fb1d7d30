"""Benchmarks: what the logit cache costs, measured on this machine in one go.

    make bench                    # = kd bench  -> data/bench/bench.json, data/bench/bench.md
    kd bench --quick              # small sizes and 2 repetitions: a smoke run in seconds
    kd bench --docs               # also docs/bench.json and the table of docs/performance.md

Two workloads: the default preset (MNIST-1D, 1D-CNN teacher, MLP student) and a CIFAR-shaped synthetic
one (3x32x32 inputs, 100 classes, ResNet-56 teacher, ResNet-8 student), so the ratios reflect a real
teacher/student cost gap. Every figure is the median of several repetitions, with min and max:

1. dump overhead       stage 1 (teacher + encode + background shard writes) / the bare teacher loop
2. cached KD overhead  one epoch of KD from cached logits / one epoch of plain CE, same student and loader
3. online KD           an epoch with the teacher in the loop / the cached KD epoch, beside the ideal
                       (teacher forward + student step) / student step
4. storage             bytes per logit for each dtype x codec, and the largest |softmax(z/T)| error vs float32
5. read throughput     rows/s of the loader's cache reads (in RAM, streamed chunk-shuffled) / a numpy memmap

Timings are reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from rich.console import Console

from pipeline import strict_json
from pipeline.config import CacheConfig, DatasetConfig, ModelConfig, OptimConfig, Paths, load_preset
from pipeline.data.datasets import Split, load_split
from pipeline.distill.batches import InMemoryBatches
from pipeline.distill.losses import cross_entropy, hinton_kd
from pipeline.errors import KDError
from pipeline.models import CONFIG_FILE, build_model, load_checkpoint, prefers_channels_last
from pipeline.store import (
    CODECS,
    DISK_DTYPES,
    DatasetInfo,
    LogitStore,
    Manifest,
    ShardWriter,
    StorageInfo,
    TeacherInfo,
    compressors,
    decode_logits,
    encode_logits,
)
from pipeline.teacher_pass import write_logits
from pipeline.training.loop import make_optimizer, pick_device, train_epoch

console = Console(stderr=True, soft_wrap=True)
GOALS = {
    "dump_overhead": 1.10,
    "cached_kd_overhead": 1.05,
    "bytes_per_logit_float16_zstd": 2.0,
    "streamed_read_vs_memmap": 0.5,
}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    dataset: DatasetConfig
    teacher: ModelConfig
    student: ModelConfig
    teacher_checkpoint: Path | None  # a trained teacher when one exists (real logits), else random init
    teacher_batch: int
    student_batch: int
    cache: CacheConfig


def run(
    paths: Paths,
    *,
    quick: bool = False,
    reps: int | None = None,
    device_name: str = "auto",
    only: list[str] | None = None,
    docs: Path | None = None,
) -> Path:
    """Run the workloads; write data/bench/; with `docs` (the docs folder), its bench.json and the table
    between the markers of its performance.md too (the docs' figures are the benchmark's, never typed)."""
    device = pick_device(device_name)
    reps = reps or (2 if quick else 5)
    workloads = _workloads(paths, quick)
    if only:
        workloads = [w for w in workloads if w.name in only]
    report: dict[str, Any] = {
        "machine": _machine(device),
        "reps": reps,
        "quick": quick,
        "goals": GOALS,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        for workload in workloads:
            console.print(f"[bold]workload {workload.name}[/bold]")
            report["workloads"][workload.name] = _bench_workload(workload, Path(tmp), device, reps, quick)
    out = paths.data / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    if docs is not None:
        write_docs(report, docs)
        console.print(f"wrote {docs / 'bench.json'} and the table of {docs / 'performance.md'}")
    from rich.markdown import Markdown

    Console(width=None if Console().is_terminal else 120).print(Markdown((out / "bench.md").read_text()))
    return out


def _workloads(paths: Paths, quick: bool) -> list[Workload]:
    preset = load_preset("tiny" if quick else "mnist1d")
    checkpoint = paths.teachers / preset.teacher.name
    cifar_samples = 320 if quick else 2560  # 80% of it is the train split that is measured
    return [
        Workload(
            name=preset.name,
            dataset=preset.dataset,
            teacher=preset.teacher.model,
            student=preset.student,
            teacher_checkpoint=checkpoint if (checkpoint / CONFIG_FILE).is_file() else None,
            teacher_batch=preset.cache.batch_size,
            student_batch=preset.distill.train.batch_size,
            cache=preset.cache,
        ),
        Workload(
            name="cifar-synthetic",
            dataset=DatasetConfig(
                name="synthetic-images",
                num_samples=cifar_samples,
                seed=0,
                val_size=1,
                options={"shape": [3, 32, 32], "num_classes": 100},
            ),
            teacher=ModelConfig(arch="resnet20" if quick else "resnet56"),
            student=ModelConfig(arch="resnet8"),
            teacher_checkpoint=None,
            teacher_batch=128,
            student_batch=128,
            cache=CacheConfig(),
        ),
    ]


def _bench_workload(w: Workload, tmp: Path, device: torch.device, reps: int, quick: bool) -> dict[str, Any]:
    split = load_split(w.dataset, "train")
    if w.teacher_checkpoint is not None:
        teacher, _ = load_checkpoint(w.teacher_checkpoint)
        teacher_kind = f"trained ({w.teacher_checkpoint})"
    else:
        torch.manual_seed(0)
        teacher = build_model(w.teacher, split.num_classes, split.input_shape)
        teacher_kind = "random init"
    teacher.to(device).eval()
    channels_last = split.inputs.dim() == 4 and prefers_channels_last(teacher)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    result: dict[str, Any] = {
        "rows": len(split),
        "classes": split.num_classes,
        "teacher": w.teacher.arch,
        "teacher_weights": teacher_kind,
        "student": w.student.arch,
        "device": str(device),
        "channels_last": channels_last,
        "teacher_batch": w.teacher_batch,
        "student_batch": w.student_batch,
    }

    # 1. dump overhead -------------------------------------------------------------------------------
    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, len(split), w.teacher_batch):
                x = split.inputs[start : start + w.teacher_batch].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                teacher(x).float().cpu()

    manifest = manifest_for(split, w.cache, "float16", "zstd")

    def dump() -> None:
        store = LogitStore.create(tmp / f"{w.name}-dump.zarr", manifest, overwrite=True)
        write_logits(teacher, split, store, device, w.teacher_batch)
        store.finish()

    console.print("  dump overhead")
    t_bare, t_dump = interleaved(bare, dump, reps)
    result["dump"] = {
        "bare_forward_s": t_bare,
        "stage1_s": t_dump,
        "ratio": ratio_of(t_dump, t_bare),
        "samples_per_s": len(split) / t_dump["median"],
    }

    # 2 + 3. cached and online distillation epochs ---------------------------------------------------
    cached = LogitStore.open(tmp / f"{w.name}-dump.zarr").read_all()[0]  # (N, C) float32, dataset order
    rows = torch.arange(len(split))
    with_logits = InMemoryBatches(split, rows, cached, w.student_batch, device)
    labels_only = InMemoryBatches(split, rows, None, w.student_batch, device)
    kd_loss = functools.partial(hinton_kd, temperature=4.0, alpha=0.9)
    optim = OptimConfig()  # AdamW, as the presets; built outside the timed functions

    def student_epoch(batches: Iterable[Any], loss: Callable[..., torch.Tensor]) -> None:
        torch.manual_seed(0)
        student = build_model(w.student, split.num_classes, split.input_shape).to(device)
        train_epoch(student, make_optimizer(student, optim), batches, loss)
        _sync(device)

    def epoch(batches: InMemoryBatches, loss: Callable[..., torch.Tensor]) -> Callable[[], None]:
        return lambda: student_epoch(batches.epoch(torch.Generator().manual_seed(0)), loss)

    def online() -> None:
        student_epoch(_with_teacher(labels_only, teacher, channels_last), kd_loss)

    def teacher_forward() -> None:
        for _ in _with_teacher(labels_only, teacher, channels_last):
            pass
        _sync(device)

    console.print("  cached vs plain epochs")
    t_ce, t_kd = interleaved(epoch(labels_only, cross_entropy), epoch(with_logits, kd_loss), reps)
    console.print("  online KD")
    t_online, t_forward = interleaved(online, teacher_forward, reps)
    result["distill"] = {
        "ce_epoch_s": t_ce,
        "cached_kd_epoch_s": t_kd,
        "cached_kd_overhead": ratio_of(t_kd, t_ce),
        "online_kd_epoch_s": t_online,
        "teacher_forward_epoch_s": t_forward,
        "online_over_cached": ratio_of(t_online, t_kd),
        "ideal_online_over_cached": (t_forward["median"] + t_ce["median"]) / t_ce["median"],
    }

    # 4. storage -------------------------------------------------------------------------------------
    console.print("  storage")
    with torch.inference_mode():
        logits32 = torch.cat(
            [
                teacher(_prep(split.inputs[i : i + w.teacher_batch], device, channels_last)).float().cpu()
                for i in range(0, len(split), w.teacher_batch)
            ]
        )
    result["storage"] = _storage(logits32, w.cache)

    # 5. read throughput -----------------------------------------------------------------------------
    console.print("  read throughput")
    result["read"] = _read_throughput(
        logits32, w.cache, tmp / w.name, reps, min_rows=20_000 if quick else 200_000
    )
    return result


def _with_teacher(batches: InMemoryBatches, teacher: torch.nn.Module, channels_last: bool):  # noqa: ANN202
    """Batches with teacher logits computed in the loop (online KD)."""
    for batch in batches.epoch(torch.Generator().manual_seed(0)):
        with torch.no_grad():
            zt = teacher(_prep(batch.inputs, batch.inputs.device, channels_last)).float()
        yield dataclasses.replace(batch, teacher_logits=zt)


def _prep(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _storage(logits32: torch.Tensor, cache: CacheConfig) -> dict[str, Any]:
    n, c = logits32.shape
    out: dict[str, Any] = {"logits": int(n * c), "bytes_per_logit": {}, "max_abs_prob_error": {}}
    for dtype in ("float32", "float16", "bfloat16"):
        stored = encode_logits(logits32, dtype)
        for codec in CODECS:
            group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
            arr = group.create_array(
                "logits",
                shape=(n, c),
                chunks=(cache.chunk_rows_for(c), c),
                shards=(cache.chunk_rows_for(c) * cache.shard_chunks, c),
                dtype=DISK_DTYPES[dtype],
                compressors=compressors(codec, cache.zstd_level, stored.dtype.itemsize),
            )
            arr[:] = stored
            out["bytes_per_logit"][f"{dtype}+{codec}"] = arr.nbytes_stored() / (n * c)
        decoded = decode_logits(stored, dtype)
        out["max_abs_prob_error"][dtype] = {
            f"T={t}": float((torch.softmax(decoded / t, 1) - torch.softmax(logits32 / t, 1)).abs().max())
            for t in (1, 4, 10)
        }
    return out


def _read_throughput(
    logits32: torch.Tensor, cache: CacheConfig, folder: Path, reps: int, min_rows: int
) -> dict[str, Any]:
    """rows/s reading every row once in shuffled order, batches of 256, as float32 tensors."""
    tiles = -(-min_rows // len(logits32))
    logits = logits32.repeat(tiles, 1)  # (R, C): a cache big enough to time
    n, c = logits.shape
    split = Split(
        dataset="bench",
        split="train",
        inputs=torch.zeros(n, 1),
        labels=torch.zeros(n, dtype=torch.int64),
        ids=torch.arange(n),
        num_classes=c,
    )
    store = LogitStore.create(
        folder.with_suffix(".read.zarr"), manifest_for(split, cache, "float16", "zstd"), overwrite=True
    )
    writer = ShardWriter(store)
    writer.add(logits, split.labels, split.ids)
    writer.close()
    store.finish()
    npy = folder.with_suffix(".npy")
    np.save(npy, encode_logits(logits, "float16"))
    batch = 256

    def memmap() -> None:
        mm = np.load(npy, mmap_mode="r")
        order = np.random.default_rng(0).permutation(n)
        for i in range(0, n, batch):
            torch.from_numpy(mm[np.sort(order[i : i + batch])].astype(np.float32))

    def streamed() -> None:
        reader = LogitStore.open(store.where)
        for buffer in reader.iter_buffers(torch.Generator().manual_seed(0)):  # as training takes them
            for i in range(0, len(buffer.order), batch):
                buffer.values[buffer.order[i : i + batch]]

    def in_ram() -> None:
        all_logits = LogitStore.open(store.where).read_all()[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        for i in range(0, n, batch):
            all_logits[order[i : i + batch]]

    t_mm, t_stream = interleaved(memmap, streamed, reps)
    t_ram = _measure(in_ram, reps)
    rate = {
        name: n / t["median"] for name, t in (("memmap", t_mm), ("streamed", t_stream), ("in_ram", t_ram))
    }
    return {
        "rows": n,
        "classes": c,
        "batch": batch,
        "chunk_rows": store.chunk_rows,
        "shard_rows": store.shard_rows,
        "memmap_s": t_mm,
        "streamed_s": t_stream,
        "in_ram_s": t_ram,
        "rows_per_s": rate,
        "streamed_over_memmap": rate["streamed"] / rate["memmap"],
        "in_ram_over_memmap": rate["in_ram"] / rate["memmap"],
    }


def manifest_for(split: Split, cache: CacheConfig, dtype: str, codec: str) -> Manifest:
    return Manifest(
        teacher=TeacherInfo(name="bench", architecture={}, fingerprint="0" * 64),
        dataset=DatasetInfo(
            name=split.dataset,
            split=split.split,
            length=len(split),
            num_classes=split.num_classes,
            fingerprint="0" * 64,
        ),
        storage=StorageInfo(
            dtype=dtype,
            chunk_rows=cache.chunk_rows_for(split.num_classes),
            shard_rows=cache.chunk_rows_for(split.num_classes) * cache.shard_chunks,
            codec=codec,
            level=cache.zstd_level,
        ),
    )


def _measure(fn: Callable[[], None], reps: int) -> dict[str, Any]:
    fn()  # warm-up: allocator, kernels, page cache
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _stats(times)


def interleaved(
    a: Callable[[], None], b: Callable[[], None], reps: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time a and b alternately, so drifts of the machine hit both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return _stats(ta), _stats(tb)


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}


def ratio_of(num: dict[str, Any], den: dict[str, Any]) -> dict[str, float]:
    return {
        "median": num["median"] / den["median"],
        "min": num["min"] / den["max"],
        "max": num["max"] / den["min"],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# kd bench",
        "",
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}, zarr {m['zarr']}, "
        f"{m['cpu_threads']} CPU threads, device {m.get('gpu', m['device'])}. Median of {report['reps']} "
        "repetitions (min - max in brackets; ratios' ranges pair the extremes).",
        "",
    ]

    def r(x: dict[str, float]) -> str:
        return f"{x['median']:.3f} ({x['min']:.3f} - {x['max']:.3f})"

    def s(x: dict[str, Any]) -> str:
        return f"{x['median']:.3f} s ({x['min']:.3f} - {x['max']:.3f})"

    for name, w in report["workloads"].items():
        d, k, rd, st = w["dump"], w["distill"], w["read"], w["storage"]
        lines += [
            f"## {name}: {w['rows']} rows x {w['classes']} classes, teacher {w['teacher']} "
            f"({w['teacher_weights']}), student {w['student']}, {w['device']}",
            "",
            "| figure | value | goal |",
            "|---|---|---|",
            f"| 1. dump overhead: stage 1 / bare teacher loop | {r(d['ratio'])} "
            f"| ≤ {GOALS['dump_overhead']} |",
            f"|    stage 1 wall time, bare loop | {s(d['stage1_s'])}, {s(d['bare_forward_s'])} | |",
            f"| 2. cached KD epoch / plain CE epoch | {r(k['cached_kd_overhead'])} "
            f"| ≤ {GOALS['cached_kd_overhead']} |",
            f"|    KD epoch, CE epoch | {s(k['cached_kd_epoch_s'])}, {s(k['ce_epoch_s'])} | |",
            f"| 3. online KD epoch / cached KD epoch | {r(k['online_over_cached'])} "
            f"(ideal {k['ideal_online_over_cached']:.2f}) | the larger the better |",
            f"| 4. bytes per logit, float16 + zstd | {st['bytes_per_logit']['float16+zstd']:.3f} "
            f"| ≤ {GOALS['bytes_per_logit_float16_zstd']} |",
            f"| 5. streamed read / memmap (rows/s) | {rd['streamed_over_memmap']:.2f} "
            f"| ≥ {GOALS['streamed_read_vs_memmap']} |",
            f"|    in-RAM read / memmap (rows/s) | {rd['in_ram_over_memmap']:.2f} | |",
            "",
            f"Read throughput over {rd['rows']} rows x {rd['classes']} (float16 + zstd, chunks of "
            f"{rd['chunk_rows']} rows, shards of {rd['shard_rows']}, batches of {rd['batch']}): "
            + ", ".join(f"{k_} {v:,.0f} rows/s" for k_, v in rd["rows_per_s"].items())
            + ".",
            "",
            "| storage | " + " | ".join(CODECS) + " | max abs prob. error T=1 / 4 / 10 |",
            "|---|" + "---|" * len(CODECS) + "---|",
        ]
        for dtype in ("float32", "float16", "bfloat16"):
            err = st["max_abs_prob_error"][dtype]
            lines.append(
                f"| {dtype} | "
                + " | ".join(f"{st['bytes_per_logit'][f'{dtype}+{c}']:.3f} B" for c in CODECS)
                + f" | {err['T=1']:.1e} / {err['T=4']:.1e} / {err['T=10']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


DOCS_BEGIN, DOCS_END = "<!-- bench:begin (written by `kd bench --docs`) -->", "<!-- bench:end -->"


def docs_table(report: dict[str, Any]) -> str:
    """The summary table of docs/performance.md: each figure per workload, in bold where its goal is met."""
    names = list(report["workloads"])
    g = report["goals"]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = []

    def ratio(value: float, ok: bool | None, digits: int = 2) -> str:
        text = f"{value:.{digits}f}"
        return f"**{text}**" if ok else text

    rows = [
        (
            f"1. stage 1 / bare teacher loop (≤ {g['dump_overhead']:.2f})",
            lambda w: ratio(w["dump"]["ratio"]["median"], w["dump"]["ratio"]["median"] <= g["dump_overhead"]),
        ),
        (
            f"2. cached KD epoch / CE epoch (≤ {g['cached_kd_overhead']:.2f})",
            lambda w: ratio(
                w["distill"]["cached_kd_overhead"]["median"],
                w["distill"]["cached_kd_overhead"]["median"] <= g["cached_kd_overhead"],
            ),
        ),
        (
            "3. online KD epoch / cached KD epoch (ideal)",
            lambda w: (
                f"{w['distill']['online_over_cached']['median']:.2f} "
                f"({w['distill']['ideal_online_over_cached']:.2f})"
            ),
        ),
        (
            f"4. bytes per logit, float16 + zstd (≤ {g['bytes_per_logit_float16_zstd']:.1f})",
            lambda w: ratio(
                w["storage"]["bytes_per_logit"]["float16+zstd"],
                w["storage"]["bytes_per_logit"]["float16+zstd"] <= g["bytes_per_logit_float16_zstd"],
            ),
        ),
        (
            f"5. streamed cache read / numpy memmap (≥ {g['streamed_read_vs_memmap']:.1f})",
            lambda w: ratio(
                w["read"]["streamed_over_memmap"],
                w["read"]["streamed_over_memmap"] >= g["streamed_read_vs_memmap"],
            ),
        ),
        ("in-RAM cache load + epoch / numpy memmap", lambda w: f"{w['read']['in_ram_over_memmap']:.2f}"),
    ]
    m = report["machine"]
    lines = [
        f"Measured by `kd bench --docs` on {m['cpu_threads']} CPU threads ({m['platform']}, "
        f"torch {m['torch']}, "
        f"device {m.get('gpu', m['device'])}), median of {report['reps']} repetitions"
        + (" (a --quick run: small sizes)" if report["quick"] else "")
        + "; bold: the goal is met.",
        "",
        "| figure (goal) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [
        f"| {label} | " + " | ".join(cell(report["workloads"][n]) for n in names) + " |"
        for label, cell in rows
    ]
    return "\n".join(lines)


def write_docs(report: dict[str, Any], docs: Path) -> None:
    """docs/bench.json (the report) and the table between the markers of docs/performance.md."""
    page = docs / "performance.md"
    text = page.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise KDError(
            f"{page} has no bench markers ({DOCS_BEGIN} ... {DOCS_END}): put them where the table goes"
        )
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    (docs / "bench.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    page.write_text(f"{head}{DOCS_BEGIN}\n{docs_table(report)}\n{DOCS_END}{tail}")
