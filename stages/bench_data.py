"""`kd bench --workload data`: inputs read by DataLoader workers, at N and 8N images.

Synthetic JPEG folders of N and 8N images (64 to 128 px, 10 classes; generated once under
DATA_DIR/bench/data/) are read as `imagefolder` with `dataset.memory_budget_mb = 0` (every batch decoded by
the workers, nothing held), by a random-init ResNet-8 teacher and student at 32 px. Each figure comes
from a fresh process, so its peak RSS is its own:

    stage 1 RSS      `kd teacher-logits --split train` at N and at 8N: peak RSS of the main process (and of
                     the largest worker)
    stage 2 RSS      one epoch of `kd distill` from that cache at N and at 8N
    stage 1 speed    samples/s of stage 1 / a bare loop of the same DataLoader and teacher forward pass
                     (channels_last, as stage 1 runs a conv teacher), at 8N
    KD epoch         an epoch of cached KD / an epoch of CE over the same DataLoader, same student, at 8N
    tokens           a text of at least 1 GB (--quick: 50 MB) tokenized into a token file: MB/s, peak RSS

Goals (the issue "Datasets bigger than memory"): RSS at 8N within 300 MB of N; stage 1 >= 0.95x the bare
loop; a KD epoch <= 1.05x a CE epoch; tokenizing with peak RSS <= 1.5 GB. Figures are measured, never
asserted; DATA_DIR/bench/data.json and data.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pipeline import strict_json
from pipeline.config import Paths

console = Console(stderr=True, soft_wrap=True)
GOALS = {"rss_growth_mb": 300, "stage1_over_bare": 0.95, "kd_over_ce": 1.05, "tokenize_rss_mb": 1536}
SIZE = 32  # the teacher's input: the shorter side resized to 36, center crop 32


DOCS_BEGIN = "<!-- bench-data:begin (written by `kd bench --workload data --docs`) -->"
DOCS_END = "<!-- bench-data:end -->"


def run(paths: Paths, *, quick: bool = False, reps: int | None = None, docs: Path | None = None) -> Path:
    n = 250 if quick else 1500
    reps = reps or (2 if quick else 3)
    out = paths.data / "bench"
    folder = out / "data"
    report: dict[str, Any] = {"n": n, "goals": GOALS, "cpu_count": os.cpu_count(), "size": SIZE}
    for count in (n, 8 * n):
        root = folder / f"jpeg-{count}"
        made = make_jpeg_folder(root, count)
        preset = _preset(folder, root, count)
        data_dir = folder / f"run-{count}"
        _teacher(data_dir, preset)
        made_text = f" (generated in {made:.0f} s)" if made else ""
        console.print(f"[bold]peak RSS of stage 1 and stage 2 at {count:,} images[/bold]{made_text}")
        report[f"stage1_{count}"] = _child("stage1", str(preset), str(data_dir))
        report[f"stage2_{count}"] = _child("stage2", str(preset), str(data_dir))
    console.print(f"[bold]stage 1 vs the bare loop, a KD vs a CE epoch[/bold] ({8 * n:,} images)")
    preset_8n = _preset(folder, folder / f"jpeg-{8 * n}", 8 * n)
    report["speed"] = _child("speed", str(preset_8n), str(folder / f"run-{8 * n}"), str(reps))
    console.print(f"[bold]tokenizing {50 if quick else 1024} MB of text into a token file[/bold]")
    report["tokens"] = _child("tokens", str(folder), str(50 if quick else 1024))
    grow1 = report[f"stage1_{8 * n}"]["peak_rss_mb"] - report[f"stage1_{n}"]["peak_rss_mb"]
    grow2 = report[f"stage2_{8 * n}"]["peak_rss_mb"] - report[f"stage2_{n}"]["peak_rss_mb"]
    report["growth"] = {"stage1_mb": grow1, "stage2_mb": grow2}
    (out / "data.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    (out / "data.md").write_text(markdown(report))
    console.print(markdown(report), highlight=False)
    console.print(f"wrote {out / 'data.json'} and {out / 'data.md'}")
    if docs is not None:
        write_docs(report, docs)
        console.print(f"wrote {docs / 'bench-data.json'} and the table of {docs / 'data.md'}")
    return out


def write_docs(report: dict[str, Any], docs: Path) -> None:
    """docs/bench-data.json (the report) and its table between the markers of docs/data.md."""
    from pipeline.errors import KDError

    page = docs / "data.md"
    text = page.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise KDError(f"{page} has no bench-data markers ({DOCS_BEGIN} ... {DOCS_END})")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    (docs / "bench-data.json").write_text(strict_json.dumps(report, indent=2) + "\n")
    table = markdown(report).split("\n", 2)[2].strip()  # without the title line
    page.write_text(f"{head}{DOCS_BEGIN}\n{table}\n{DOCS_END}{tail}")


def make_jpeg_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> float | None:
    """`count` JPEG files of 64 to 128 px (train) and count // 10 (test), a class per subfolder: smooth
    class colours plus noise. Made once (a `complete` marker); seconds taken, or None when reused."""
    if (root / "complete").is_file():
        return None
    from PIL import Image

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    colors = rng.integers(30, 225, (classes, 3))
    for split, total in (("train", count), ("test", max(count // 10, classes))):
        for c in range(classes):
            (root / split / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(total):
            c = i % classes
            h, w = (int(v) for v in rng.integers(64, 129, 2))
            pixels = np.clip(colors[c] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / f"class{c:02d}" / f"{i:07d}.jpg", quality=85)
    (root / "complete").write_text("")
    return time.perf_counter() - started


def _preset(folder: Path, root: Path, count: int) -> Path:
    path = folder / f"preset-{count}.toml"
    path.write_text(
        f"""[dataset]
name = "imagefolder"
val_size = 50
memory_budget_mb = 0
options = {{ train = "{root / "train"}", test = "{root / "test"}", size = {SIZE}, resize = {SIZE + 4} }}
[teacher]
name = "bench-resnet8"
[teacher.model]
arch = "resnet8"
[student]
arch = "resnet8"
[cache]
batch_size = 256
[distill]
temperature = 4.0
alpha = 0.9
[distill.train]
epochs = 1
batch_size = 128
"""
    )
    return path


def _teacher(data_dir: Path, preset: Path) -> None:
    """A random-init ResNet-8 teacher checkpoint (the speed of stage 1 does not depend on its weights)."""
    from pipeline.config import load_preset
    from pipeline.models import architecture_record, build_model, save_checkpoint

    folder = data_dir / "teachers" / "bench-resnet8"
    if (folder / "model.safetensors").is_file():
        return
    p = load_preset(str(preset))
    import torch

    torch.manual_seed(0)
    model = build_model(p.teacher.model, 10, (3, SIZE, SIZE))
    save_checkpoint(
        folder, model, architecture_record(p.teacher.model, 10, (3, SIZE, SIZE)), {"name": "bench"}
    )


def _child(kind: str, *args: str) -> dict[str, Any]:
    """One measurement in a fresh process (its own peak RSS)."""
    code = (
        "import json, sys; from stages.bench_data import measure; print(json.dumps(measure(*sys.argv[1:])))"
    )
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, kind, *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"data bench '{kind}' failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(kind: str, *args: str) -> dict[str, Any]:
    """Run in a child process: one figure of the report."""
    from stages.bench_scale import peak_rss_kb

    started = time.perf_counter()
    if kind == "stage1":
        figures = _stage1(Path(args[0]), Path(args[1]))
    elif kind == "stage2":
        figures = _stage2(Path(args[0]), Path(args[1]))
    elif kind == "speed":
        figures = _speed(Path(args[0]), Path(args[1]), int(args[2]))
    else:
        figures = _tokens(Path(args[0]), int(args[1]))
    import resource

    return {
        **figures,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_kb() / 1024,
        "largest_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _stage1(preset_path: Path, data_dir: Path) -> dict[str, Any]:
    from pipeline.config import load_preset
    from stages import teacher_logits

    preset = load_preset(str(preset_path))
    started = time.perf_counter()
    teacher_logits.run(preset, Paths(data=data_dir), splits=("train",), force=True)
    rows = len(list((Path(preset.dataset.options["train"])).rglob("*.jpg")))
    return {"rows": rows, "samples_per_s": rows / (time.perf_counter() - started)}


def _stage2(preset_path: Path, data_dir: Path) -> dict[str, Any]:
    from pipeline.config import load_preset, with_overrides
    from stages import distill, teacher_logits

    preset = load_preset(str(preset_path))
    teacher_logits.run(preset, Paths(data=data_dir), splits=("test",))  # the train cache: stage 1's
    preset = with_overrides(preset, {"distill.memory_budget_mb": 0})  # the cache streamed too
    summary = distill.run(preset, Paths(data=data_dir), run_name="bench", verbose=False)
    import shutil

    shutil.rmtree(Paths(data=data_dir).runs / "bench", ignore_errors=True)
    return {"student_test_accuracy": summary.get("student_test_accuracy")}


def _speed(preset_path: Path, data_dir: Path, reps: int) -> dict[str, Any]:
    """Stage 1 vs the bare loop, a cached KD epoch vs a CE epoch, over the same DataLoader."""
    import functools
    import tempfile

    import torch

    from pipeline.config import OptimConfig, load_preset
    from pipeline.data.datasets import load_split
    from pipeline.data.readers import iter_rows
    from pipeline.distill.batches import InMemoryBatches, cached_logits_for
    from pipeline.distill.losses import cross_entropy, hinton_kd
    from pipeline.models import build_model, load_checkpoint, prefers_channels_last
    from pipeline.store import LogitStore
    from pipeline.teacher_pass import write_logits
    from pipeline.training.loop import make_optimizer, train_epoch
    from stages.bench import interleaved, manifest_for, ratio_of

    preset = load_preset(str(preset_path))
    split = load_split(preset.dataset, "train")
    device = torch.device("cpu")
    teacher, _ = load_checkpoint(data_dir / "teachers" / "bench-resnet8")
    teacher.eval()
    batch = preset.cache.batch_size
    tmp = Path(tempfile.mkdtemp())
    manifest = manifest_for(split, preset.cache, "float16", "zstd")

    channels_last = prefers_channels_last(teacher)  # as stage 1 runs it
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode():
            for x in iter_rows(split.inputs, batch):
                teacher(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()

    def stage1() -> None:
        store = LogitStore.create(tmp / "dump.zarr", manifest, overwrite=True)
        write_logits(teacher, split, store, device, batch)
        store.finish()

    t_bare, t_stage1 = interleaved(bare, stage1, reps)
    logits = cached_logits_for(LogitStore.open(tmp / "dump.zarr"), split)
    rows = torch.arange(len(split))
    student_batch = preset.distill.train.batch_size
    with_logits = InMemoryBatches(split, rows, logits, student_batch, device)
    labels_only = InMemoryBatches(split, rows, None, student_batch, device)
    kd = functools.partial(hinton_kd, temperature=4.0, alpha=0.9)

    def epoch(batches: InMemoryBatches, loss: Any) -> Any:
        def one() -> None:
            torch.manual_seed(0)
            student = build_model(preset.student, split.num_classes, split.input_shape)
            train_epoch(
                student, make_optimizer(student, OptimConfig()), batches.epoch(torch.Generator()), loss
            )

        return one

    t_ce, t_kd = interleaved(epoch(labels_only, cross_entropy), epoch(with_logits, kd), reps)
    return {
        "rows": len(split),
        "workers": split.inputs.workers,  # type: ignore[union-attr]
        "bare_s": t_bare,
        "stage1_s": t_stage1,
        "stage1_over_bare": 1 / ratio_of(t_stage1, t_bare)["median"],
        "stage1_samples_per_s": len(split) / t_stage1["median"],
        "bare_samples_per_s": len(split) / t_bare["median"],
        "ce_epoch_s": t_ce,
        "kd_epoch_s": t_kd,
        "kd_over_ce": ratio_of(t_kd, t_ce)["median"],
    }


def _tokens(folder: Path, megabytes: int) -> dict[str, Any]:
    """Tokenize a text of `megabytes` MB (the built-in docstrings repeated, written once) into a token
    file, streaming: `lm-text`'s own path (pipeline.data.tokens.TokenFile.write)."""
    from pipeline.data.lm_data import EOS, paragraphs, python_docstrings, tokenizer_for
    from pipeline.data.tokens import TokenFile

    docs = python_docstrings()
    text = folder / f"text-{megabytes}mb.txt"
    if not text.is_file() or text.stat().st_size < megabytes * 2**20:
        base = ("\n\n".join(docs) + "\n\n").encode()
        with text.open("wb") as f:
            for _ in range(-(-megabytes * 2**20 // len(base))):
                f.write(base)
    tokenizer = tokenizer_for({"vocab": 2048}, docs)  # the default BPE, trained on the docstrings once
    out = folder / f"text-{megabytes}mb.tokens"
    started = time.perf_counter()
    made = TokenFile.write(paragraphs(text), tokenizer, out, tokenizer.token_to_id(EOS))
    seconds = time.perf_counter() - started
    size = text.stat().st_size
    out.unlink()
    out.with_name(out.name + ".json").unlink()
    return {
        "text_mb": size / 2**20,
        "tokens": made.tokens,
        "mb_per_s": size / 2**20 / seconds,
        "tokens_per_s": made.tokens / seconds,
        "tokenize_s": seconds,
    }


def markdown(report: dict[str, Any]) -> str:
    n, g = report["n"], report["goals"]

    def verdict(ok: bool) -> str:
        if n < 1500:
            return "not judged (--quick)"
        return "met" if ok else "missed"

    s1, s1b = report[f"stage1_{n}"], report[f"stage1_{8 * n}"]
    s2, s2b = report[f"stage2_{n}"], report[f"stage2_{8 * n}"]
    sp, tok, grow = report["speed"], report["tokens"], report["growth"]
    lines = [
        f"# kd bench --workload data: JPEG folders of {n:,} and {8 * n:,} images "
        f"(64-128 px, read at {report['size']} px)",
        "",
        f"{report['cpu_count']} CPUs; `dataset.memory_budget_mb = 0` (every batch decoded by "
        f"{sp['workers']} DataLoader worker(s)); ResNet-8 teacher and student, random init.",
        "",
        "| figure | at N | at 8N | goal |",
        "|---|---|---|---|",
        f"| stage 1 peak RSS (MB) | {s1['peak_rss_mb']:,.0f} | {s1b['peak_rss_mb']:,.0f} | 8N within "
        f"{g['rss_growth_mb']} MB of N: {verdict(grow['stage1_mb'] <= g['rss_growth_mb'])} "
        f"(+{grow['stage1_mb']:,.0f}) |",
        f"| stage 2 peak RSS (MB) | {s2['peak_rss_mb']:,.0f} | {s2b['peak_rss_mb']:,.0f} | 8N within "
        f"{g['rss_growth_mb']} MB of N: {verdict(grow['stage2_mb'] <= g['rss_growth_mb'])} "
        f"(+{grow['stage2_mb']:,.0f}) |",
        f"| largest worker peak RSS, stage 1 (MB) | {s1['largest_worker_rss_mb']:,.0f} | "
        f"{s1b['largest_worker_rss_mb']:,.0f} | - |",
        f"| stage 1 samples/s | {s1['samples_per_s']:,.0f} | {s1b['samples_per_s']:,.0f} | - |",
        "",
        f"- stage 1 / bare loop (same DataLoader and teacher, at 8N): {sp['stage1_over_bare']:.2f}x the bare "
        f"loop's speed ({sp['stage1_samples_per_s']:,.0f} vs {sp['bare_samples_per_s']:,.0f} samples/s; goal "
        f">= {g['stage1_over_bare']}: {verdict(sp['stage1_over_bare'] >= g['stage1_over_bare'])})",
        f"- cached KD epoch / CE epoch (same DataLoader, at 8N): {sp['kd_over_ce']:.2f} (goal <= "
        f"{g['kd_over_ce']}: {verdict(sp['kd_over_ce'] <= g['kd_over_ce'])})",
        f"- tokenizing {tok['text_mb']:,.0f} MB of text into a token file: {tok['mb_per_s']:.1f} MB/s, "
        f"{tok['tokens']:,} tokens, peak RSS {tok['peak_rss_mb']:,.0f} MB (goal <= "
        f"{g['tokenize_rss_mb']} MB: {verdict(tok['peak_rss_mb'] <= g['tokenize_rss_mb'])}); the text is "
        "the built-in docstrings repeated, which the tokenizer's word cache favours",
    ]
    if n < 1500:
        lines += ["", "A --quick run checks that the figures come out: too small to judge goals."]
    return "\n".join(lines) + "\n"
