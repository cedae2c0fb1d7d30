"""`kd bench --workload scale` (= make bench-scale): reading a cache far bigger than memory.

A synthetic cache of 1,000,000 rows x 1,000 classes float16 (2 GB of logits; generated, no teacher) is
written once under DATA_DIR/bench/scale/ and read three ways, each in a fresh process so its peak RSS
is its own:

    local     streamed from local disk: shard-shuffled, prefetched, every shard CRC-checked
    remote    streamed lazily from the loopback S3 server (moto, real HTTP on 127.0.0.1) through the
              bounded local shard cache, as `kd distill --cache s3://...` reads a far cache; then
              opened once more, as a sweep's next run would (its first batch only)
    memmap    the baseline: a numpy .npy of the same float16 logits, memory-mapped, read in shuffled
              256-row batches of sorted indices

Reported: rows/s, seconds to the first batch, bytes fetched, peak RSS; in DATA_DIR/bench/scale.json
and scale.md. Figures are measured, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from pipeline import strict_json
from pipeline.config import Paths
from pipeline.errors import KDError
from pipeline.store import (
    DatasetInfo,
    LogitStore,
    Manifest,
    ShardWriter,
    StorageInfo,
    TeacherInfo,
)

console = Console(stderr=True, soft_wrap=True)
GOALS = {
    "remote_over_local": 0.5,
    "local_over_memmap": 0.5,
    "first_batch_s": 2.0,
    "rss_over_budget_mb": 500,
}
MEMORY_BUDGET_MB = 256  # the distill.memory_budget_mb the streamed readers are held to
SHARD_CACHE_MB = 256  # distill.remote_cache_mb of the remote reader


def run(paths: Paths, *, quick: bool = False) -> Path:
    if importlib.util.find_spec("moto") is None:
        raise KDError(
            "the scale benchmark serves its remote leg from moto's loopback S3 server, which is not "
            "installed: pip install 'kd-cache[dev]' (make setup does)"
        )
    rows, classes = (20_000, 100) if quick else (1_000_000, 1_000)
    out = paths.data / "bench"
    folder = out / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / f"scale-{rows}x{classes}.zarr"
    npy = folder / f"scale-{rows}x{classes}.npy"
    write_s = _write(cache, npy, rows, classes)
    report: dict[str, Any] = {
        "rows": rows,
        "classes": classes,
        "logits_bytes": rows * classes * 2,
        "stored_bytes": LogitStore.open(cache).nbytes_stored(),
        "write_s": write_s,
        "memory_budget_mb": MEMORY_BUDGET_MB,
        "shard_cache_mb": SHARD_CACHE_MB,
        "goals": GOALS,
        "cpu_count": os.cpu_count(),
    }
    report["local"] = _child("local", str(cache))
    report["memmap"] = _child("memmap", str(npy))
    with _s3_server() as endpoint:
        url = "s3://bench/scale.zarr"
        t0 = time.perf_counter()
        from pipeline.remote import copy_cache

        copy_cache(cache, url, overwrite=True)
        report["upload_s"] = time.perf_counter() - t0
        shard_dir = folder / "shard-cache"
        shutil.rmtree(shard_dir, ignore_errors=True)  # a first open: nothing kept from an earlier run
        report["remote"] = _child("remote", url, endpoint=endpoint, shard_dir=str(shard_dir))
        # the next run over the same far cache (a sweep's): its ids and done flags kept locally
        report["remote_again"] = _child("remote-again", url, endpoint=endpoint, shard_dir=str(shard_dir))
    report["ratios"] = {
        "remote_over_local": report["remote"]["rows_per_s"] / report["local"]["rows_per_s"],
        "local_over_memmap": report["local"]["rows_per_s"] / report["memmap"]["rows_per_s"],
    }
    (out / "scale.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(report))
    console.print(markdown(report), highlight=False)
    console.print(f"wrote {out / 'scale.json'} and {out / 'scale.md'}")
    return out


def _write(cache: Path, npy: Path, rows: int, classes: int) -> float | None:
    """The synthetic cache and its .npy twin, generated in blocks (never the whole in memory); reused
    when complete. Seconds it took, or None when reused."""
    if cache.exists() and npy.exists():
        try:
            if LogitStore.open(cache).is_complete:
                return None
        except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
            pass
    started = time.perf_counter()
    manifest = Manifest(
        teacher=TeacherInfo(name="synthetic", architecture={}, fingerprint="0" * 64),
        dataset=DatasetInfo(
            name="scale", split="train", length=rows, num_classes=classes, fingerprint="0" * 64
        ),
        storage=StorageInfo(dtype="float16", chunk_rows=512, shard_rows=512 * 16),
    )
    store = LogitStore.create(cache, manifest, overwrite=True)
    twin = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(rows, classes))
    writer = ShardWriter(store)
    generator = torch.Generator().manual_seed(0)
    block = 16_384
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        logits = 3 * torch.randn(stop - start, classes, generator=generator)  # teacher-like spread
        labels = logits.argmax(1)
        writer.add(logits, labels, torch.arange(start, stop))
        twin[start:stop] = logits.numpy().astype(np.float16)
    writer.close()
    twin.flush()
    del twin
    store.finish()
    return time.perf_counter() - started


def _child(kind: str, where: str, **extra: str) -> dict[str, Any]:
    """One reading run in a fresh process: its own figures and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "endpoint" in extra:
        env.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=extra["endpoint"],
        )
    code = "import json, sys; from stages.bench_scale import read; print(json.dumps(read(*sys.argv[1:])))"
    argv = [sys.executable, "-c", code, kind, where, extra.get("shard_dir", "")]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scale bench '{kind}' failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def read(kind: str, where: str, shard_dir: str = "") -> dict[str, Any]:
    """Read every row once in shuffled order as float32 batches of 256 (run in a child process)."""
    batch = 256
    started = time.perf_counter()
    first: float | None = None
    rows = 0
    fetched = 0
    if kind == "memmap":
        mm = np.load(where, mmap_mode="r")
        order = np.random.default_rng(0).permutation(len(mm))
        for i in range(0, len(mm), batch):
            torch.from_numpy(mm[np.sort(order[i : i + batch])].astype(np.float32))
            first = first or time.perf_counter() - started
            rows += min(batch, len(mm) - i)
        fetched = int(mm.nbytes)
    else:
        store = LogitStore.open(where)
        if kind.startswith("remote"):  # as distill opens a far cache it streams
            from pipeline.store.shard_cache import ShardCache

            store.shard_cache = ShardCache(Path(shard_dir), SHARD_CACHE_MB * 2**20)
        store.require_complete()
        seed = 1 if kind == "remote-again" else 0  # the next run's shard order
        for buffer in store.iter_buffers(torch.Generator().manual_seed(seed), buffer_blocks=2):
            for i in range(0, len(buffer.order), batch):  # gathered batch by batch, as training does
                buffer.values[buffer.order[i : i + batch]]
                first = first or time.perf_counter() - started
            rows += len(buffer.order)
            if kind == "remote-again":  # its first batch is the figure
                break
        fetched = store.logit_bytes_read
    seconds = time.perf_counter() - started
    peak_kb = peak_rss_kb()
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "first_batch_s": first,
        "bytes_fetched": fetched,
        "peak_rss_mb": peak_kb / 1024,
    }


def peak_rss_kb() -> int:
    """This process's peak resident set (Linux VmHWM: its own memory map, unlike ru_maxrss, which keeps
    the parent's high-water mark across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class _s3_server:  # noqa: N801 - a context manager, used as `with _s3_server() as endpoint`
    """The loopback S3 server of the tests (moto), with an empty bucket `bench`."""

    def __enter__(self) -> str:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        endpoint = f"http://127.0.0.1:{port}"
        self.saved = {
            k: os.environ.get(k)
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
        }
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        import fsspec
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # not one cached with another endpoint
        fs, _ = fsspec.core.url_to_fs("s3://bench")
        fs.mkdir("bench")
        return endpoint

    def __exit__(self, *exc: object) -> None:
        import s3fs

        self.server.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems, and so this endpoint
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def markdown(report: dict[str, Any]) -> str:
    g, r, again = report["goals"], report["ratios"], report["remote_again"]
    budget = report["memory_budget_mb"] + g["rss_over_budget_mb"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = [
        f"# kd bench-scale: {report['rows']:,} rows x {report['classes']:,} classes float16",
        "",
        f"{_size(report['logits_bytes'])} of logits, {_size(report['stored_bytes'])} stored (zstd);"
        f" {report['cpu_count']} CPUs; readers held to a {report['memory_budget_mb']} MB memory "
        f"budget, the remote one to a {report['shard_cache_mb']} MB local shard cache.",
        "",
        "| reader | rows/s | first batch (s) | logits read (decoded) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "local": "local, streamed",
        "remote": "remote (S3 loopback, moto), lazy, first open",
        "memmap": "numpy memmap",
    }
    for kind, name in names.items():
        x = report[kind]
        lines.append(
            f"| {name} | {x['rows_per_s']:,.0f} | {x['first_batch_s']:.2f} | {_size(x['bytes_fetched'])} "
            f"| {x['peak_rss_mb']:,.0f} |"
        )
        if kind == "remote":  # the next run of a sweep: ids and done flags kept beside the shards
            lines.append(f"| remote, opened again (next run) | - | {again['first_batch_s']:.2f} | - | - |")
    first = max(report["local"]["first_batch_s"], again["first_batch_s"])
    rss = max(report["local"]["peak_rss_mb"], report["remote"]["peak_rss_mb"])
    lines += [
        "",
        f"- remote / local streamed: {r['remote_over_local']:.2f} (goal >= {g['remote_over_local']}: "
        f"{verdict(r['remote_over_local'] >= g['remote_over_local'])})",
        f"- local streamed / memmap: {r['local_over_memmap']:.2f} (goal >= {g['local_over_memmap']}: "
        f"{verdict(r['local_over_memmap'] >= g['local_over_memmap'])})",
        f"- first batch, local and re-opened remote: {first:.2f} s (goal <= {g['first_batch_s']} s: "
        f"{verdict(first <= g['first_batch_s'])}); a first remote open: "
        f"{report['remote']['first_batch_s']:.2f} s",
        f"- peak RSS: {rss:,.0f} MB (goal <= budget + {g['rss_over_budget_mb']} MB = {budget} MB: "
        f"{verdict(rss <= budget)})",
    ]
    if report["rows"] < 1_000_000:
        lines += ["", "A --quick run checks that the readers work: its figures are too small to judge goals."]
    return "\n".join(lines) + "\n"


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
