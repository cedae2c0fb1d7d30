"""File-backed sources read by DataLoader workers: an image folder and .npy memmaps bigger than their
memory budget give the in-memory path's cache bytes and training numbers; fingerprints stream once, are
kept, and change with a file; a damaged image is one line naming it, with nothing written lost; kill -9
and resume stays byte-identical."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DatasetConfig, Paths
from pipeline.data import datasets
from pipeline.data.datasets import load_split
from pipeline.data.readers import ImageFiles, NpyRows, SampleReader, read_rows
from pipeline.errors import KDError
from pipeline.store import LogitStore
from tests import cli_process
from tests.test_cli import kd
from tests.test_resume import array_files
from tests.test_sources import write_preset

STREAMED = ["--set", "dataset.memory_budget_mb=0", "--set", "dataset.workers=2"]


@pytest.fixture(autouse=True)
def _own_kept_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Digests are kept per test (the kept folder is the user's cache folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    datasets._built.clear()


def make_jpegs(root: Path, per_class: int, seed: int, size: tuple[int, int] = (20, 28)) -> list[Path]:
    """Three classes of noisy colour blocks as JPEG files of `size` (not square: resize + crop act)."""
    rng = np.random.default_rng(seed)
    files = []
    for label, color in (("a", (200, 40, 40)), ("b", (40, 200, 40)), ("c", (40, 40, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 50, (*size, 3)), 0, 255).astype(np.uint8)
            files.append(root / label / f"{i:03d}.jpg")
            Image.fromarray(pixels).save(files[-1], quality=90)
    return files


def image_preset(tmp_path: Path, chunk_rows: int = 16) -> str:
    """Shards of one chunk of `chunk_rows` rows: the 48 train rows span several shards."""
    make_jpegs(tmp_path / "train", 16, 0)
    make_jpegs(tmp_path / "test", 6, 1)
    path = write_preset(
        tmp_path / "img.toml",
        f'name = "imagefolder"\noptions = {{ train = "{tmp_path / "train"}", '
        f'test = "{tmp_path / "test"}", size = 16, resize = 18 }}',
        'arch = "mlp"\noptions = { hidden = [32] }',
        'arch = "mlp"\noptions = { hidden = [16] }',
    )
    text = (
        Path(path).read_text().replace("[cache]\n", f"[cache]\nshard_chunks = 1\nchunk_rows = {chunk_rows}\n")
    )
    Path(path).write_text(text)
    return path


def image_config(tmp_path: Path, **settings: object) -> DatasetConfig:
    options = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test"), "size": 16, "resize": 18}
    return DatasetConfig(name="imagefolder", options=options, **settings)  # type: ignore[arg-type]


def test_streamed_images_give_the_in_memory_cache_bytes_and_run(tmp_path: Path) -> None:
    preset = image_preset(tmp_path)
    memory, streamed = Paths(data=tmp_path / "memory"), Paths(data=tmp_path / "streamed")
    assert kd(memory, "train-teacher", "--preset", preset).exit_code == 0
    shutil.copytree(memory.teachers, streamed.teachers)
    runs = {}
    sweep = ["sweep", "--grid", "temperature=1,4", "--mode", "one-pass", "--name", "w"]
    for paths, extra in ((memory, []), (streamed, STREAMED)):
        for args in (["teacher-logits"], ["distill", "--run-name", "s"], sweep):
            result = kd(paths, *args, "--preset", preset, *extra)
            assert result.exit_code == 0, result.output
        runs[paths.data.name] = (paths.runs / "s" / "metrics.jsonl").read_text()
        runs[f"{paths.data.name} sweep"] = (paths.data / "sweeps" / "w" / "results.csv").read_text()
    for split in ("train", "test"):
        (a,) = memory.logits.glob(f"t.imagefolder.{split}.*.zarr")
        (b,) = streamed.logits.glob(f"t.imagefolder.{split}.*.zarr")
        assert a.name == b.name  # the same key: the fingerprint is the files', however they are read
        assert array_files(a) == array_files(b)  # every chunk, byte for byte

    def epochs(text: str) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if "second" not in k} for line in text.splitlines()
        ]

    assert epochs(runs["memory"]) == epochs(runs["streamed"])  # the same batches: the same student
    held = runs["memory sweep"].replace(str(memory.data), str(streamed.data)).splitlines()
    seconds = [i for i, column in enumerate(held[0].split(",")) if "second" in column or "time" in column]

    def results(rows: list[str]) -> list[list[str]]:
        return [[v for i, v in enumerate(row.split(",")) if i not in seconds] for row in rows]

    # a one-pass sweep (N students at once) trains on the workers' batches as on the held ones
    assert results(held) == results(runs["streamed sweep"].splitlines())


def test_image_reader_is_the_fixed_view_and_reads_rows_in_order(tmp_path: Path) -> None:
    make_jpegs(tmp_path / "train", 4, 0)
    make_jpegs(tmp_path / "test", 2, 1)
    split = load_split(image_config(tmp_path, memory_budget_mb=0, workers=2), "train")
    reader = split.inputs
    assert isinstance(reader, ImageFiles) and split.streamed and reader.shape == (12, 3, 16, 16)
    assert reader.paths == sorted(reader.paths) and reader.paths[0] == "a/000.jpg"
    assert split.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and split.ids.tolist() == list(range(12))
    # the fixed view by hand: the shorter side (20) to 18, a centered 16 x 16, [0, 1]
    from torchvision.transforms.v2 import functional as F

    raw = torch.from_numpy(np.array(Image.open(tmp_path / "train" / "b" / "001.jpg").convert("RGB")))
    expected = F.center_crop(F.resize(raw.permute(2, 0, 1), [18], antialias=True), [16, 16]).float() / 255
    assert torch.equal(reader.sample(5), expected) and torch.equal(reader[5], expected)
    rows = torch.tensor([7, 0, 11, 5] * 40)  # through the workers (more than a few rows), in this order
    assert torch.equal(read_rows(reader, rows), torch.stack([reader.sample(int(i)) for i in rows]))
    from pipeline.data.readers import rows_of
    from pipeline.training.loop import predict

    carve = rows_of(reader, rows)  # a validation carve stays a reader, read as batches ask
    assert len(carve) == 160 and carve.shape == (160, 3, 16, 16) and not torch.is_tensor(carve)
    assert torch.equal(
        predict(torch.nn.Flatten(), carve, torch.device("cpu"), 64), read_rows(reader, rows).flatten(1)
    )
    assert torch.equal(carve[torch.tensor([1, 0])], reader[rows[[1, 0]]])
    memory = load_split(image_config(tmp_path), "train")
    assert not memory.streamed and torch.equal(memory.inputs, reader[:])
    assert memory.fingerprint == split.fingerprint
    test = load_split(image_config(tmp_path, memory_budget_mb=0), "test")
    assert test.ids.tolist() == list(range(12, 18))  # test ids after train's


def test_fingerprints_stream_once_are_kept_and_follow_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_jpegs(tmp_path / "train", 3, 0)
    make_jpegs(tmp_path / "test", 2, 1)
    cfg = image_config(tmp_path, memory_budget_mb=0)
    first = load_split(cfg, "train").fingerprint
    datasets._built.clear()

    def no_second_read(self: SampleReader):  # noqa: ANN202
        raise AssertionError("the files were hashed a second time")

    with monkeypatch.context() as patch:  # unchanged files: the kept digest, no byte read
        patch.setattr(ImageFiles, "stream_content", no_second_read)
        assert load_split(cfg, "train").fingerprint == first
    datasets._built.clear()
    pixels = np.asarray(Image.open(files[4])).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(files[4], quality=95)
    assert load_split(cfg, "train").fingerprint != first
    datasets._built.clear()
    files[4].rename(files[4].with_name("zzz.jpg"))  # a renamed file: its id moves, the print changes too
    changed = load_split(cfg, "train").fingerprint
    assert changed != first


def npy_folders(tmp_path: Path) -> DatasetConfig:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 2, 6)) * 3
    for split, n in (("train", 90), ("test", 30)):
        y = rng.integers(0, 3, n)
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "x.npy", (centers[y] + rng.normal(size=(n, 2, 6))).astype(np.float16))
        np.save(tmp_path / split / "y.npy", y.astype(np.int32))
    options = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}
    return DatasetConfig(name="npy", options=options, memory_budget_mb=0, workers=1)


def test_npy_memmap_rows_and_fingerprint(tmp_path: Path) -> None:
    cfg = npy_folders(tmp_path)
    split = load_split(cfg, "train")
    x = np.load(tmp_path / "train" / "x.npy")
    assert isinstance(split.inputs, NpyRows) and split.input_shape == (2, 6) and split.num_classes == 3
    rows = torch.tensor([5, 1, 89, 5])
    assert torch.equal(split.inputs[rows], torch.from_numpy(x[rows.numpy()].astype(np.float32)))
    assert split.ids.tolist() == list(range(90))
    test = load_split(cfg, "test")
    assert test.ids.tolist() == list(range(90, 120))
    held = load_split(DatasetConfig(**{**cfg.__dict__, "memory_budget_mb": 64}), "train")
    assert torch.is_tensor(held.inputs) and held.fingerprint == split.fingerprint
    datasets._built.clear()
    x[3, 0, 0] += 1
    np.save(tmp_path / "train" / "x.npy", x)
    assert load_split(cfg, "train").fingerprint != split.fingerprint


def test_npy_source_runs_both_stages_streamed(tmp_path: Path) -> None:
    npy_folders(tmp_path)
    preset = write_preset(
        tmp_path / "npy.toml",
        f'name = "npy"\nmemory_budget_mb = 0\nworkers = 1\noptions = {{ train = "{tmp_path / "train"}", '
        f'test = "{tmp_path / "test"}" }}',
        'arch = "mlp"\noptions = { hidden = [32] }',
        'arch = "mlp"\noptions = { hidden = [16] }',
    )
    paths = Paths(data=tmp_path / "data")
    for args in (["train-teacher"], ["teacher-logits"], ["distill", "--run-name", "n"]):
        result = kd(paths, *args, "--preset", preset)
        assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "n" / "summary.json").read_text())
    assert summary["student_test_accuracy"] > 0.6  # separated clusters; chance is 1/3


@pytest.mark.parametrize("where", ["train", "test"])
def test_a_damaged_image_is_one_line_naming_it_and_nothing_is_lost(tmp_path: Path, where: str) -> None:
    preset = image_preset(tmp_path)
    paths = Paths(data=tmp_path / "data")
    env = {**os.environ, "KD_DATA_DIR": str(paths.data), "TQDM_DISABLE": "1"}
    for stage in ("train-teacher", "teacher-logits"):
        assert cli_process.run([stage, "--preset", preset, *STREAMED], env).returncode == 0
    before = {p: p.read_bytes() for p in sorted(paths.data.rglob("*")) if p.is_file()}
    bad = tmp_path / where / "b" / "002.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    for budget in (STREAMED, []):  # read by workers, or read whole into memory: the same line
        result = cli_process.run(["teacher-logits", "--preset", preset, *budget], env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "worker process" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        lines = lines[[i for i, line in enumerate(lines) if line.startswith("error:")][0] :]
        assert len(lines) <= 3 and lines[0].startswith("error: cannot read input"), lines
        assert str(bad) in " ".join(" ".join(lines).split()), lines
    assert before == {p: p.read_bytes() for p in before}  # the teacher and both caches, untouched


def test_kill_9_then_resume_is_byte_identical_with_streamed_images(tmp_path: Path) -> None:
    preset = image_preset(tmp_path, chunk_rows=8)
    reference = Paths(data=tmp_path / "reference")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("KD_FAULT_AFTER_SHARDS", None)
    args = ["teacher-logits", "--preset", preset, "--split", "train", *STREAMED]
    at_reference = {**env, "KD_DATA_DIR": str(reference.data)}
    assert cli_process.run(["train-teacher", "--preset", preset], at_reference).returncode == 0
    assert cli_process.run(args, at_reference).returncode == 0
    (expected,) = reference.logits.glob("t.imagefolder.train.*.zarr")
    killed = Paths(data=tmp_path / "killed")
    shutil.copytree(reference.teachers, killed.teachers)
    run = cli_process.run(args, {**env, "KD_DATA_DIR": str(killed.data), "KD_FAULT_AFTER_SHARDS": "3"})
    assert run.returncode == -9, run.stderr
    (path,) = killed.logits.glob("t.imagefolder.train.*.zarr")
    assert int(LogitStore.open(path).shards_done().sum()) == 3
    resumed = cli_process.run(args, {**env, "KD_DATA_DIR": str(killed.data)})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert array_files(path) == array_files(expected)


def test_reader_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(KDError, match="no class subfolders"):
        load_split(image_config(tmp_path), "train")
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(KDError, match="holds no image files"):
        load_split(image_config(tmp_path), "train")
    with pytest.raises(KDError, match="size .* resize"):
        load_split(DatasetConfig(name="imagefolder", options={"size": 32, "resize": 16}), "train")
    with pytest.raises(KDError, match=f"dataset.options.train = {tmp_path} has no x.npy and no y.npy"):
        load_split(DatasetConfig(name="npy", options={"train": str(tmp_path)}), "train")
    with pytest.raises(KDError, match="nowhere does not exist: it must be a folder holding x.npy"):
        load_split(DatasetConfig(name="npy", options={"train": str(tmp_path / "nowhere")}), "train")


def in_memory_sequences(documents: list[str], tokenizer, seq_len: int, eos: int, pad: int):  # noqa: ANN001, ANN201
    """The sequences as lm-text cut them before token files: the whole stream in memory, windows of
    seq_len + 1, the last one padded (labels -100 past the stream)."""
    stream = [t for enc in tokenizer.encode_batch(documents) for t in (*enc.ids, eos)]
    window = seq_len + 1
    count = -(-len(stream) // window)
    padded = torch.full((count * window,), pad, dtype=torch.int64)
    padded[: len(stream)] = torch.tensor(stream)
    rows = padded.view(count, window)
    labels = rows[:, 1:].clone()
    labels[torch.arange(count * window).view(count, window)[:, :-1] >= len(stream) - 1] = -100
    return rows[:, :-1], labels


def test_token_file_windows_equal_the_in_memory_sequences(tmp_path: Path) -> None:
    from pipeline.data import lm_data
    from pipeline.data.tokens import TokenWindows

    docs = lm_data.python_docstrings()[:300]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    options = {"text": str(text), "vocab": 300, "seq_len": 12}
    streamed = DatasetConfig(name="lm-text", num_samples=0, options=options, memory_budget_mb=0)
    train, test = load_split(streamed, "train"), load_split(streamed, "test")
    assert isinstance(train.inputs, TokenWindows) and isinstance(train.labels, TokenWindows)
    assert train.task == "sequence" and train.input_shape == (12,)
    tokenizer = datasets.tokenizer_of(streamed)
    eos, pad = tokenizer.token_to_id(lm_data.EOS), tokenizer.token_to_id(lm_data.PAD)
    inputs, labels = in_memory_sequences(list(lm_data.paragraphs(text)), tokenizer, 12, eos, pad)
    every = torch.arange(len(inputs))
    assert torch.equal(torch.cat([train.inputs[:], test.inputs[:]]), inputs)
    assert torch.equal(torch.cat([train.labels[:], test.labels[:]]), labels)
    assert (test.labels[-1] == -100).any() and torch.equal(test.inputs[-1], inputs[-1])  # the padded end
    rows = torch.tensor([3, 0, 3, len(train) - 1])
    assert torch.equal(train.inputs[rows], inputs[rows]) and torch.equal(train.labels[rows], labels[rows])
    held = load_split(DatasetConfig(name="lm-text", num_samples=0, options=options), "train")
    assert torch.is_tensor(held.inputs) and torch.equal(held.inputs, inputs[every[: len(train)]])
    assert held.fingerprint == train.fingerprint  # one fingerprint, held or read from the file
    (kept,) = (tmp_path / "xdg" / "kd").glob("tokens-*.bin")  # tokenized once, kept; a new text: another
    datasets._built.clear()
    text.write_text(text.read_text() + "\n\none more paragraph")
    assert load_split(streamed, "train").fingerprint != train.fingerprint
    assert len(list((tmp_path / "xdg" / "kd").glob("tokens-*.bin"))) == 2


def test_a_streamed_token_file_trains_as_the_in_memory_one(tmp_path: Path) -> None:
    """tiny-lm from windows of its token file (memory budget 0): the same caches, the same student."""
    memory, streamed = Paths(data=tmp_path / "memory"), Paths(data=tmp_path / "streamed")
    assert kd(memory, "train-teacher", "--preset", "tiny-lm").exit_code == 0
    shutil.copytree(memory.teachers, streamed.teachers)
    runs = {}
    for paths, extra in ((memory, []), (streamed, ["--set", "dataset.memory_budget_mb=0"])):
        for args in (["teacher-logits"], ["distill", "--run-name", "s"]):
            result = kd(paths, *args, "--preset", "tiny-lm", *extra)
            assert result.exit_code == 0, result.output
        runs[paths.data.name] = json.loads((paths.runs / "s" / "summary.json").read_text())
    for split in ("train", "test"):
        (a,) = memory.logits.glob(f"*.{split}.*.zarr")
        (b,) = streamed.logits.glob(f"*.{split}.*.zarr")
        assert a.name == b.name and array_files(a) == array_files(b)
    assert runs["memory"]["student_test_perplexity"] == runs["streamed"]["student_test_perplexity"]


class Echo(torch.nn.Module):
    """A 'teacher' whose logits are its input image, flattened: a cache of it stores what it saw."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_random_resized_crop_views_replay_bit_for_bit(tmp_path: Path) -> None:
    """Stage 1 draws K random-resized-crop views per image in the workers and stores their boxes; stage
    2 replays a stored box on the decoded file, in memory and streamed: the student's input is the
    teacher's, bit for bit (on the CPU)."""
    from pipeline.data.augment import RRC, AugmentSpec, crop_box, views_record
    from pipeline.distill.batches import (
        InMemoryBatches,
        StreamedBatches,
        Views,
        cached_logits_for,
        cached_views_for,
    )
    from pipeline.store import DatasetInfo, Manifest, StorageInfo, TeacherInfo
    from pipeline.teacher_pass import write_logits

    make_jpegs(tmp_path / "train", 5, 0, size=(37, 53))
    make_jpegs(tmp_path / "test", 1, 1)
    for budget in (0, 64):  # read by the workers, or held in memory (views still cut from the files)
        datasets._built.clear()
        split = load_split(image_config(tmp_path, memory_budget_mb=budget, workers=1), "train")
        spec = AugmentSpec(RRC)
        manifest = Manifest(
            teacher=TeacherInfo(name="echo", architecture={}, fingerprint="0" * 64),
            dataset=DatasetInfo(
                name="img",
                split="train",
                length=len(split),
                num_classes=3 * 16 * 16,
                fingerprint=split.fingerprint,
            ),
            storage=StorageInfo(dtype="float32", chunk_rows=4, shard_rows=8),
            views=views_record(spec, 3, seed=7),
        )
        store = LogitStore.create(tmp_path / f"rrc-{budget}.zarr", manifest)
        write_logits(Echo(), split, store, torch.device("cpu"), batch_size=4)
        store.finish()
        store = LogitStore.open(tmp_path / f"rrc-{budget}.zarr")
        params = cached_views_for(store, split)  # (N, K, 5) boxes, dataset order
        assert params is not None and params.shape == (15, 3, 5)
        for row in (0, 7, 14):  # the boxes are (seed, id, view)'s, for the decoded image's size
            for k in range(3):
                assert tuple(params[row, k].tolist()) == crop_box(7, int(split.ids[row]), k, 37, 53)
        assert len({tuple(p) for p in params.flatten(0, 1).tolist()}) > 40  # drawn, not repeated
        logits = cached_logits_for(store, split)
        views = Views(spec, params, "random", 0)
        batches = InMemoryBatches(split, torch.arange(15), logits, 4, torch.device("cpu"), views)
        streamed = StreamedBatches(store, split, torch.arange(15), 4, torch.device("cpu"), views=Views(spec))
        for source in (batches, streamed):
            seen = 0
            for batch in source.epoch(torch.Generator().manual_seed(1)):
                assert batch.augmented and batch.inputs.shape[1:] == (3, 16, 16)
                assert torch.equal(batch.inputs.flatten(1), batch.teacher_logits)  # bit for bit
                seen += len(batch.inputs)
            assert seen == 15
        # a fresh view (no cache of views): drawn by the workers, deterministic per (seed, id)
        fresh = InMemoryBatches(split, torch.arange(15), None, 4, torch.device("cpu"), Views(spec))
        first = [b.inputs for b in fresh.epoch(torch.Generator().manual_seed(2))]
        again = [b.inputs for b in fresh.epoch(torch.Generator().manual_seed(2))]
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(torch.cat(first).sort(0).values, split.inputs[:].sort(0).values)


def test_random_resized_crop_from_the_cli(tmp_path: Path) -> None:
    preset = image_preset(tmp_path)
    paths = Paths(data=tmp_path / "data")
    views = ["--set", "cache.augment=random-resized-crop", "--set", "cache.views=2"]
    assert kd(paths, "train-teacher", "--preset", preset).exit_code == 0
    for args in (["teacher-logits", *views], ["distill", "--run-name", "rrc", *views, *STREAMED]):
        result = kd(paths, *args, "--preset", preset)
        assert result.exit_code == 0, result.output
    config = json.loads((paths.runs / "rrc" / "config.json").read_text())
    assert "random-resized-crop" in config["views"]
    (cache,) = paths.logits.glob("t.imagefolder.train.*.zarr")
    assert LogitStore.open(cache).manifest.views["augment"]["scale"] == [0.08, 1.0]
    result = kd(paths, "teacher-logits", "--preset", preset, "--set", "cache.augment=random-resized-crop")
    assert result.exit_code == 2 and "continuous space of views" in " ".join(result.stderr.split())
    elsewhere = Paths(data=tmp_path / "elsewhere")
    result = kd(
        elsewhere, "train-teacher", "--preset", "tiny", "--set", "teacher.train.augment=random-resized-crop"
    )
    assert result.exit_code == 2
    assert "needs an imagefolder or hf-images source" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_two_processes_read_streamed_images_as_one(tmp_path: Path) -> None:
    """Under torchrun each rank's workers decode its own shards' rows (and draw their views): the cache is
    byte-identical to one process's; a streamed stage 2 trains on both ranks' shares."""
    from tests.test_distributed import torchrun

    preset = image_preset(tmp_path, chunk_rows=8)
    views = ["--set", "cache.augment=random-resized-crop", "--set", "cache.views=2"]
    one, two = Paths(data=tmp_path / "one"), Paths(data=tmp_path / "two")
    assert kd(one, "train-teacher", "--preset", preset).exit_code == 0
    shutil.copytree(one.teachers, two.teachers)
    assert kd(one, "teacher-logits", "--preset", preset, *views, *STREAMED).exit_code == 0
    result = torchrun(two.data, "teacher-logits", "--preset", preset, *views, *STREAMED)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("train", "test"):
        (a,) = one.logits.glob(f"t.imagefolder.{split}.*.zarr")
        (b,) = two.logits.glob(f"t.imagefolder.{split}.*.zarr")
        assert a.name == b.name and array_files(a) == array_files(b)
    stream = ["--set", "distill.memory_budget_mb=0", "--set", "distill.train.batch_size=8"]
    result = torchrun(
        two.data, "distill", "--preset", preset, "--run-name", "ddp", *views, *STREAMED, *stream
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two.runs / "ddp" / "summary.json").read_text())["student_test_accuracy"] is not None


def image_rows(folder: Path, kind: str) -> dict[str, str]:
    """make_jpegs' images as Hugging Face `datasets` rows (an Image column of the JPEG bytes): saved with
    save_to_disk, or as parquet files."""
    import datasets as hf

    options = {}
    for split, n, seed in (("train", 8, 0), ("test", 2, 1)):
        files = make_jpegs(folder / "jpeg" / split, n, seed)
        rows = hf.Dataset.from_dict(
            {"image": [str(f) for f in files], "label": [ord(f.parent.name) - ord("a") for f in files]},
            features=hf.Features({"image": hf.Image(), "label": hf.Value("int64")}),
        )
        rows = rows.cast_column("image", hf.Image(decode=False)).map(
            lambda row: {"image": {"bytes": Path(row["image"]["path"]).read_bytes(), "path": None}}
        )
        if kind == "disk":
            rows.save_to_disk(str(folder / split))
            options[split] = str(folder / split)
        else:
            rows.to_parquet(str(folder / f"{split}.parquet"))
            options[split] = str(folder / f"{split}.parquet")
    return options if kind == "disk" else {**options, "format": "parquet"}


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_hf_image_rows_decode_as_the_image_files_do(tmp_path: Path, kind: str) -> None:
    from pipeline.data.arrow import ArrowImages

    options = {**image_rows(tmp_path, kind), "size": 16, "resize": 18}
    split = load_split(
        DatasetConfig(name="hf-images", options=options, memory_budget_mb=0, workers=1), "train"
    )
    assert isinstance(split.inputs, ArrowImages) and split.inputs.shape == (24, 3, 16, 16)
    folder = load_split(image_config(tmp_path / "jpeg"), "train")  # the same JPEGs as files
    assert torch.equal(split.inputs[:], folder.inputs)  # decoded from Arrow bytes as from the files
    assert torch.equal(split.labels, folder.labels)
    test = load_split(DatasetConfig(name="hf-images", options=options, memory_budget_mb=0), "test")
    assert test.ids.tolist() == list(range(24, 30))
    preset = write_preset(
        tmp_path / "hf.toml",
        f'name = "hf-images"\nmemory_budget_mb = 0\noptions = {json.dumps(options).replace(":", " =")}',
        'arch = "mlp"\noptions = { hidden = [32] }',
        'arch = "mlp"\noptions = { hidden = [16] }',
    )
    paths = Paths(data=tmp_path / "data")
    views = ["--set", "cache.augment=random-resized-crop", "--set", "cache.views=2"]
    for args in (["train-teacher"], ["teacher-logits", *views], ["distill", "--run-name", "hf", *views]):
        result = kd(paths, *args, "--preset", preset)
        assert result.exit_code == 0, result.output


def test_reading_inputs_leaves_the_global_rng_and_the_run_name_alone(tmp_path: Path) -> None:
    """Reading through workers draws nothing from torch's global generator (a model initialized after the
    data is read is the same, held or streamed), and how inputs are read is not part of a run's name."""
    from pipeline.config import load_preset, with_overrides
    from pipeline.data.readers import prefetched
    from pipeline.runs.identity import default_run_name

    make_jpegs(tmp_path / "train", 4, 0)
    make_jpegs(tmp_path / "test", 1, 1)
    split = load_split(image_config(tmp_path, memory_budget_mb=0, workers=1), "train")
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    for _ in prefetched(split.inputs, [(torch.arange(12), None)] * 3, workers=1):
        pass
    assert torch.equal(torch.random.get_rng_state(), before)
    preset = load_preset(image_preset(tmp_path / "p"))
    how = {"dataset.memory_budget_mb": 0, "dataset.workers": 2}
    assert default_run_name(with_overrides(preset, how), how) == default_run_name(preset, {})


def test_own_loop_cuts_random_resized_crop_views_as_the_workers_do(tmp_path: Path) -> None:
    """pipeline.cut_view on a decoded image, then the reader's scaling, is the stored view's input; and
    pipeline.replay refuses such views in one line (it would return the uncut input)."""
    import pipeline
    from pipeline.data.augment import RRC, AugmentSpec, crop_box

    make_jpegs(tmp_path / "train", 2, 0, size=(30, 41))
    make_jpegs(tmp_path / "test", 1, 1)
    reader = load_split(image_config(tmp_path, memory_budget_mb=0), "train").inputs
    views, boxes = reader.answer(3, ("draw", 5, 2, 3))
    image = torch.from_numpy(np.array(Image.open(tmp_path / "train" / "b" / "001.jpg").convert("RGB")))
    for k in range(2):
        assert tuple(boxes[k].tolist()) == crop_box(5, 3, k, 30, 41)
        own = pipeline.cut_view(image.permute(2, 0, 1), boxes[k], 16).float() / 255
        assert torch.equal(own, views[k])
    with pytest.raises(KDError, match="cut each with pipeline.cut_view"):
        pipeline.replay(views, boxes, AugmentSpec(RRC))


def test_train_teacher_refuses_torchrun_and_cache_info_names_crop_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data.augment import RRC, AugmentSpec, views_record
    from pipeline.store import DatasetInfo, Manifest, StorageInfo, TeacherInfo
    from pipeline.store.describe import views_text
    from tests.test_cli import assert_one_line_error

    with monkeypatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: every process would save the same teacher
        result = kd(Paths(data=tmp_path), "train-teacher", "--preset", "tiny")
        assert_one_line_error(result, "kd train-teacher runs in one process: run it without torchrun")
    manifest = Manifest(
        teacher=TeacherInfo(name="t", architecture={}, fingerprint="0" * 64),
        dataset=DatasetInfo(name="d", split="train", length=4, num_classes=3, fingerprint="0" * 64),
        storage=StorageInfo(dtype="float16", chunk_rows=4, shard_rows=4),
        views=views_record(AugmentSpec(RRC), 3, seed=1),
    )
    text = views_text(manifest.views)
    assert "scale [0.08, 1.0], ratio [0.75, 1.333]" in text and "pad" not in text
