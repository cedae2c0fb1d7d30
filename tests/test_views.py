"""Augmented views (README "Augmented views"): K replayable views per sample in stage 1, replayed in stage 2.

The claims tested here: a view's parameters depend only on (view seed, sample id, view index); the stored
logits of view k are the teacher's on the replayed input; the student's input and target are always the
same view; cycling walks every view; DDP ranks split the one-process batch; resume, verify, export/import
and the one-line refusals keep their promises for the new layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Paths, load_preset, with_overrides
from pipeline.data.augment import AugmentSpec, augment, replay, view_params
from pipeline.data.datasets import Split, load_split
from pipeline.distill.batches import InMemoryBatches, StreamedBatches, Views
from pipeline.errors import KDError
from pipeline.models import load_checkpoint
from pipeline.store import LogitStore, cache_key
from tests import cli_process
from tests.conftest import VIEW_ARGS, VIEW_SETTINGS, cache_paths, view_cache
from tests.factories import PRECISION, raw_logit_tolerance
from tests.test_bad_inputs import assert_refused, run_kd, snapshot
from tests.test_resume import array_files


# -- parameters and replay -------------------------------------------------------------------------
def test_view_parameters_depend_only_on_seed_id_and_view() -> None:
    spec = AugmentSpec("crop-flip", 4)
    ids = np.arange(1000, 1300)
    whole = view_params(spec, ids, 8, seed=7)
    assert whole.shape == (300, 8, 3) and whole.dtype == np.int16
    np.testing.assert_array_equal(view_params(spec, ids[::-1], 8, seed=7), whole[::-1])  # order-free
    np.testing.assert_array_equal(view_params(spec, ids[100:103], 8, seed=7), whole[100:103])  # batch-free
    assert not np.array_equal(view_params(spec, ids, 8, seed=8), whole)  # the seed matters
    for row in whole:  # distinct views of one sample, each a point of the space
        assert len({tuple(v) for v in row.tolist()}) == 8
    assert whole[..., :2].min() >= 0 and whole[..., :2].max() <= 8 and set(np.unique(whole[..., 2])) == {0, 1}
    every = view_params(spec, ids[:2], "all", seed=7)
    np.testing.assert_array_equal(every[0], spec.enumerate())
    assert len({tuple(v) for v in spec.enumerate().tolist()}) == spec.space == 9 * 9 * 2
    with pytest.raises(KDError, match="only 162 distinct views"):
        view_params(spec, ids, 163, seed=0)


def test_replay_is_the_augmentation_it_names() -> None:
    x = torch.randn(3, 40)
    offsets = torch.tensor([[2], [-3], [0]])
    circular = replay(x, offsets, AugmentSpec("shift", 4))
    for i, k in enumerate([2, -3, 0]):
        assert torch.equal(circular[i], torch.roll(x[i], k))
    zero = replay(x, offsets, AugmentSpec("shift-zero", 4))
    assert torch.equal(zero[0, 2:], x[0, :-2]) and torch.equal(zero[0, :2], torch.zeros(2))
    assert torch.equal(zero[1, :-3], x[1, 3:]) and torch.equal(zero[1, -3:], torch.zeros(3))
    images = torch.randn(2, 3, 8, 8)
    spec = AugmentSpec("crop-flip", 2)
    out = replay(images, torch.tensor([[2, 2, 0], [0, 4, 1]]), spec)
    assert torch.equal(out[0], images[0])  # the centre crop, not flipped
    padded = torch.nn.functional.pad(images[1], (2, 2, 2, 2))
    assert torch.equal(out[1], padded[:, 0:8, 4:12].flip(-1))  # rows from dy=0, cols from dx=4, mirrored


def test_fresh_augmentation_draws_every_view_of_the_space() -> None:
    torch.manual_seed(0)
    x = torch.arange(9, dtype=torch.float32).repeat(3000, 1)  # each row 0..8: a shift moves element 0
    seen = augment(x, "shift", pad=2)[:, 0]
    assert set(seen.tolist()) == {0.0, 1.0, 2.0, 7.0, 8.0}  # offsets -2..2 put x[-o] first


# -- stage 1 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stage_1_stores_the_teachers_logits_of_each_replayed_view(views_data: Paths) -> None:
    store = LogitStore.open(view_cache(views_data))
    store.require_complete()
    m = store.manifest
    assert m.format["version"] == 3 and m.layout == "views" and store.row_shape == (3, 10)
    assert m.views == {
        "count": 3,
        "all": False,
        "seed": 0,
        "augment": {"kind": "shift", "pad": 2, "params": ["offset"]},
        "version": 1,
    }
    split = load_split(load_preset("tiny").dataset, "train")
    params = store.read_views()
    np.testing.assert_array_equal(params, view_params(AugmentSpec("shift", 2), split.ids.numpy(), 3, 0))
    logits, _, ids = store.read_all()
    assert logits.shape == (800, 3, 10) and torch.equal(ids, split.ids)
    teacher, _ = load_checkpoint(views_data.teachers / "tiny-cnn1d")
    with torch.no_grad():
        for k in range(3):  # raw logits of the replayed view, as float16 stores them
            expected = teacher.eval()(replay(split.inputs, torch.from_numpy(params[:, k]), store.augment))
            torch.testing.assert_close(logits[:, k], expected, **raw_logit_tolerance(PRECISION))
    assert not torch.equal(logits[:, 0], logits[:, 1])  # other views, other logits
    # the test split stays the fixed view; the dense keys are what they were before views existed
    (test,) = cache_paths(views_data, "test")
    dense = LogitStore.open(test).manifest
    assert dense.views == {} and dense.format["version"] == 2
    assert dense.key == cache_key(
        dense.teacher.fingerprint, dense.dataset, dense.preprocessing, dense.storage
    )
    assert m.key != cache_key(m.teacher.fingerprint, m.dataset, m.preprocessing, m.storage)


@pytest.mark.slow
def test_view_cache_resumes_byte_identical_after_kill_9(views_data: Paths, tmp_path: Path) -> None:
    import os
    import subprocess

    def dump(data: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "KD_DATA_DIR": str(data), "TQDM_DISABLE": "1"}
        env.pop("KD_FAULT_AFTER_SHARDS", None)
        if kill_after is not None:
            env["KD_FAULT_AFTER_SHARDS"] = str(kill_after)
        return cli_process.run(["teacher-logits", "--preset", "tiny", "--split", "train", *VIEW_ARGS], env)

    expected_path = view_cache(views_data)
    data = tmp_path / "killed"
    shutil.copytree(views_data.teachers, data / "teachers")
    assert dump(data, kill_after=2).returncode == -9
    resumed = dump(data)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "2/4 shards done" in resumed.stderr
    path = data / "logits" / expected_path.name  # the same key
    files = {
        **array_files(path),
        **{str(p.relative_to(path)): p.read_bytes() for p in (path / "views").rglob("*") if p.is_file()},
    }
    reference = {
        **array_files(expected_path),
        **{
            str(p.relative_to(expected_path)): p.read_bytes()
            for p in (expected_path / "views").rglob("*")
            if p.is_file()
        },
    }
    assert files == reference and any(name.startswith("views/") for name in files)
    assert LogitStore.open(path).manifest.shard_crc32c == LogitStore.open(expected_path).manifest.shard_crc32c


@pytest.mark.slow
def test_verify_covers_the_views_array(views_data: Paths, tmp_path: Path) -> None:
    import zarr

    copy = tmp_path / view_cache(views_data).name
    shutil.copytree(view_cache(views_data), copy)
    assert LogitStore.open(copy).verify() == []
    views = zarr.open_group(str(copy), mode="r+")["views"]
    offset = int(views[5, 1, 0])
    views[5, 1, 0] = -offset if offset else 1  # a different, still valid shift: only the checksum knows
    problems = LogitStore.open(copy).verify()
    assert problems == ["shard 0 (rows 0-256) fails its CRC32C checksum"], problems
    views[300, 0, 0] = 7  # no shift of pad 2: not a view of this augmentation
    assert LogitStore.open(copy).verify()[1:] == [
        "shard 1 (rows 256-512) fails its CRC32C checksum",
        "shard 1 (rows 256-512) holds view parameters outside its augmentation's range",
    ]
    with pytest.raises(KDError, match="shard 0 fails its CRC32C checksum"):
        LogitStore.open(copy).read_all()


# -- stage 2 ---------------------------------------------------------------------------------------
def coded_split(n: int = 40, length: int = 12) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """A split whose row i is the ramp i*100 + t, with 4 stored views (shifts) per row whose logits encode
    (row, view): logits[i, k] = [i, k, offset, 0, ...]."""
    inputs = torch.arange(n, dtype=torch.float32)[:, None] * 100 + torch.arange(length, dtype=torch.float32)
    split = Split("coded", "train", inputs, torch.zeros(n, dtype=torch.int64), torch.arange(n) + 500, 5)
    params = torch.from_numpy(view_params(AugmentSpec("shift", 3), split.ids.numpy(), 4, seed=1))
    logits = torch.zeros(n, 4, 5)
    logits[:, :, 0] = torch.arange(n, dtype=torch.float32)[:, None]
    logits[:, :, 1] = torch.arange(4, dtype=torch.float32)
    logits[:, :, 2] = params[:, :, 0].float()
    return split, logits, params


def assert_input_is_targets_view(batch_inputs: torch.Tensor, targets: torch.Tensor, split: Split) -> None:
    spec = AugmentSpec("shift", 3)
    rows = targets[:, 0].long()
    offsets = targets[:, 2].long()[:, None]
    torch.testing.assert_close(batch_inputs, replay(split.inputs[rows], offsets, spec), rtol=0, atol=0)


def test_in_memory_batches_replay_the_view_whose_logits_they_give() -> None:
    split, logits, params = coded_split()
    spec = AugmentSpec("shift", 3)
    batches = InMemoryBatches(
        split, torch.arange(40), logits, 8, torch.device("cpu"), Views(spec, params, "random", 0)
    )
    generator = torch.Generator().manual_seed(0)
    picked = []
    for _ in range(3):
        for batch in batches.epoch(generator):
            assert batch.augmented and batch.teacher_logits is not None
            assert_input_is_targets_view(batch.inputs, batch.teacher_logits, split)
            picked += batch.teacher_logits[:, 1].long().tolist()
    assert set(picked) == {0, 1, 2, 3}  # random views: every one comes up


def test_cycle_walks_every_view_once_per_k_epochs() -> None:
    split, logits, params = coded_split()
    batches = InMemoryBatches(
        split,
        torch.arange(40),
        logits,
        16,
        torch.device("cpu"),
        Views(AugmentSpec("shift", 3), params, "cycle", 3),
    )
    generator = torch.Generator().manual_seed(0)
    seen: dict[int, list[int]] = {}
    for _ in range(4):
        for batch in batches.epoch(generator):
            assert batch.teacher_logits is not None
            for row, view in batch.teacher_logits[:, :2].long().tolist():
                seen.setdefault(row, []).append(view)
    assert all(sorted(views) == [0, 1, 2, 3] for views in seen.values()) and len(seen) == 40
    assert len({tuple(v) for v in seen.values()}) > 1  # rows start at different views


def test_ddp_ranks_split_the_one_process_view_batches() -> None:
    split, logits, params = coded_split()
    views = Views(AugmentSpec("shift", 3), params, "random", 0)

    def run(rank: int, world: int) -> list[torch.Tensor]:
        batches = InMemoryBatches(split, torch.arange(40), logits, 8, torch.device("cpu"), views)
        batches.shard(rank, world)
        generator = torch.Generator().manual_seed(4)
        return [
            torch.cat([b.inputs, b.teacher_logits], 1) for _ in range(2) for b in batches.epoch(generator)
        ]

    one = run(0, 1)
    ranks = [run(r, 2) for r in range(2)]
    for i, whole in enumerate(one):  # rank r holds rows r, r + 2, ... of every global batch
        assert torch.equal(whole[0::2], ranks[0][i]) and torch.equal(whole[1::2], ranks[1][i])


@pytest.mark.slow
def test_streamed_view_batches_pair_inputs_with_their_views(views_data: Paths) -> None:
    store = LogitStore.open(view_cache(views_data))
    split = load_split(load_preset("tiny").dataset, "train")
    logits, _, _ = store.read_all()
    flat = logits.reshape(-1, 10)  # row-major: entry 3 * row + view
    params = torch.from_numpy(store.read_views())
    streamed = StreamedBatches(
        store, split, torch.arange(len(split)), 64, torch.device("cpu"), views=Views(choice="cycle")
    )
    generator = torch.Generator().manual_seed(0)
    views_of: dict[int, list[int]] = {}
    for _ in range(3):
        for batch in streamed.epoch(generator):
            assert batch.augmented and batch.teacher_logits is not None
            for x, zt in zip(batch.inputs, batch.teacher_logits, strict=True):
                match = int(torch.nonzero((flat == zt).all(1))[0])  # which stored (row, view) this target is
                row, view = divmod(match, 3)
                replayed = replay(split.inputs[row : row + 1], params[row : row + 1, view], store.augment)
                assert torch.equal(x, replayed[0])
                views_of.setdefault(row, []).append(view)
    assert len(views_of) == len(split) and all(sorted(v) == [0, 1, 2] for v in views_of.values())


# -- end to end: every method, online KD, export/import, refusals -----------------------------------
SHORT = ["--set", "distill.train.epochs=6", "--set", "distill.annealing.phase1_epochs=4"]
SHORT += ["--set", "distill.continuation.psi_epochs=3"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "annealing", "continuation", "ce"])
def test_every_method_trains_on_replayed_views(views_data: Paths, tmp_path: Path, method: str) -> None:
    import json

    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(views_data.logits, paths.logits)
    result = kd(
        paths, "distill", "--preset", "tiny", "--method", method, "--run-name", "v", *VIEW_ARGS, *SHORT
    )
    assert result.exit_code == 0, result.output
    config = json.loads((paths.runs / "v" / "config.json").read_text())
    summary = json.loads((paths.runs / "v" / "summary.json").read_text())
    if method == "ce":  # labels only: the student's inputs as they are
        assert config["views"] == "none"
    else:
        assert config["views"] == "cached: 3 shift views (pad 2), one per row per epoch (random)"
        assert summary["cache"] == str(view_cache(paths))
    # measured at seed 0 after 6 epochs: 0.22 (dkd) to 0.32 (dist); chance is 0.10
    assert summary["student_val_accuracy"] > 0.17


def test_online_and_cached_students_start_from_the_same_weights(tiny_data: Paths) -> None:
    """Online and cached KD under one seed are a paired comparison: loading the online teacher (built
    from a random init, then overwritten) draws nothing from the RNG the student is initialised from."""
    from pipeline.distill.batches import OnlineBatches
    from pipeline.distill.student_data import prepare
    from pipeline.training.loop import seed_everything

    states = []
    for online in (False, True):
        preset = with_overrides(load_preset("tiny"), {"distill.teacher_online": online})
        seed_everything(preset.distill.seed)
        data = prepare(preset, tiny_data, cache=None, device=torch.device("cpu"))
        assert isinstance(data.batches, OnlineBatches) == online
        states.append(torch.random.get_rng_state())
    assert torch.equal(states[0], states[1])


@pytest.mark.slow
def test_online_kd_runs_the_teacher_on_the_students_views(views_data: Paths, tmp_path: Path) -> None:
    import json

    from pipeline.distill.batches import OnlineBatches
    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(views_data.teachers, paths.teachers)  # no cache at all: online needs none
    argv = ["distill", "--preset", "tiny", "--online", "--run-name", "o", "--epochs", "3"]
    result = kd(paths, *argv, "--set", "distill.train.augment=shift", "--set", "distill.train.augment_pad=2")
    assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "o" / "summary.json").read_text())
    assert summary["views"] == "fresh shift (pad 2), teacher run on the same views (online)"
    assert summary["cache"] is None and summary["teacher"] == "tiny-cnn1d"
    (test_cache,) = cache_paths(views_data, "test")  # the teacher's test accuracy, computed directly
    assert summary["teacher_test_accuracy"] == pytest.approx(  # on a GPU, bf16 may flip one of 200
        LogitStore.open(test_cache).manifest.teacher_accuracy, abs=1e-6 if PRECISION == "fp32" else 0.011
    )
    # each batch's targets are the teacher's logits of exactly that batch's (augmented) inputs
    teacher, _ = load_checkpoint(paths.teachers / "tiny-cnn1d")
    split = load_split(load_preset("tiny").dataset, "train")
    base = InMemoryBatches(
        split, torch.arange(64), None, 32, torch.device("cpu"), Views(AugmentSpec("shift", 2))
    )
    for batch in OnlineBatches(base, teacher.eval()).epoch(torch.Generator().manual_seed(0)):
        assert batch.augmented and batch.teacher_logits is not None
        assert not any(torch.equal(x, y) for x, y in zip(batch.inputs, split.inputs[:64], strict=False))
        with torch.no_grad():
            assert torch.equal(batch.teacher_logits, teacher(batch.inputs))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "hdf5"])
def test_export_import_keeps_the_views(views_data: Paths, tmp_path: Path, fmt: str) -> None:
    from stages import cache_interop

    source = view_cache(views_data)
    out = cache_interop.export(source, tmp_path / f"views.{fmt}", fmt)
    preset = with_overrides(load_preset("tiny"), VIEW_SETTINGS)
    made = cache_interop.import_(out, preset, tmp_path / "root", split="train", teacher_name="tiny-cnn1d")
    before, after = LogitStore.open(source), LogitStore.open(made)
    assert after.manifest.views == before.manifest.views and after.manifest.layout == "views"
    np.testing.assert_array_equal(after.read_views(), before.read_views())
    assert torch.equal(after.read_all()[0], before.read_all()[0])
    assert after.verify() == []


@pytest.mark.slow
def test_view_refusals_are_one_line_and_touch_nothing(views_data: Paths, tmp_path: Path) -> None:
    import json

    data = tmp_path / "data"
    shutil.copytree(views_data.data, data)
    before = snapshot(data)
    cases = [
        (  # the student would get two augmentations
            ["distill", "--preset", "tiny", *VIEW_ARGS, "--set", "distill.train.augment=shift-zero"],
            "the cache holds shift views (pad 2) but distill.train.augment is shift-zero",
        ),
        (  # more views than the augmentation has
            ["teacher-logits", "--preset", "tiny", *VIEW_ARGS, "--set", "cache.views=9"],
            "cache.views = 9 but augment 'shift' (pad 2) has only 5 distinct views",
        ),
        (
            ["teacher-logits", "--preset", "tiny", "--set", "cache.views=4"],
            "cache.views = 4 needs an augmentation",
        ),
        (
            ["teacher-logits", "--preset", "tiny", "--set", "cache.augment=crop-flip"],
            "augment 'crop-flip' needs images (C, H, W)",
        ),
        (
            ["distill", "--preset", "tiny", "--set", "distill.views=sometimes"],
            "distill.views must be random or cycle",
        ),
        (  # no cache of these views yet: the message names them
            ["distill", "--preset", "tiny", *VIEW_ARGS, "--set", "cache.view_seed=5"],
            "cache of teacher 'tiny-cnn1d' for this dataset with 3 shift views (pad 2)",
        ),
    ]
    for argv, text in cases:
        assert_refused(run_kd(data, *argv), text)
    # a cache whose views this version cannot replay (written by a future kd)
    future = tmp_path / "future.zarr"
    shutil.copytree(view_cache(views_data), future)
    meta = json.loads((future / "zarr.json").read_text())
    meta["attributes"]["views"]["version"] = 99
    (future / "zarr.json").write_text(json.dumps(meta))
    assert_refused(
        run_kd(data, "distill", "--preset", "tiny", "--cache", str(future)),
        "holds views of augmentation 'shift' version 99, which this kd cannot replay",
    )
    assert snapshot(data) == before


@pytest.mark.slow
def test_fixed_view_cache_with_an_augmented_student_warns(tiny_data: Paths, tmp_path: Path) -> None:
    from tests.test_housekeeping import copy_caches

    paths = copy_caches(tiny_data, tmp_path)
    argv = ["distill", "--preset", "tiny", "--epochs", "2", "--set", "distill.train.augment=shift"]
    result = run_kd(paths.data, *argv)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "targets and inputs differ" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_torchrun_writes_the_same_view_cache_and_trains_like_one_process(
    views_data: Paths, tmp_path: Path
) -> None:
    import json

    from tests.test_cli import kd
    from tests.test_distributed import cpu_reference, torchrun

    data = tmp_path / "ddp"
    shutil.copytree(views_data.teachers, data / "teachers")
    result = torchrun(data, "teacher-logits", "--preset", "tiny", "--split", "train", *VIEW_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = cpu_reference(views_data, tmp_path, "--split", "train", *VIEW_ARGS)
    single, double = view_cache(reference), view_cache(Paths(data=data))
    assert single.name == double.name
    assert array_files(double) == array_files(single)
    views = {p.relative_to(single): p.read_bytes() for p in (single / "views").rglob("*") if p.is_file()}
    assert {
        p.relative_to(double): p.read_bytes() for p in (double / "views").rglob("*") if p.is_file()
    } == views
    # DDP over replayed views: the per-epoch validation accuracy of one process with the same global batch
    shutil.copytree(views_data.logits, data / "logits", dirs_exist_ok=True)
    argv = ["distill", "--preset", "tiny", "--epochs", "3", *VIEW_ARGS]
    result = torchrun(data, *argv, "--run-name", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    one = kd(Paths(data=data), *argv, "--run-name", "one", "--device", "cpu")
    assert one.exit_code == 0, one.output

    def curve(name: str) -> list[float]:
        return [json.loads(line)["val_accuracy"] for line in (data / "runs" / name / "metrics.jsonl").open()]

    assert curve("ddp") == curve("one")


@pytest.mark.slow
def test_view_cache_pushes_pulls_and_trains_from_s3(views_data: Paths, tmp_path: Path, s3: str) -> None:
    from tests.test_cli import kd

    source = view_cache(views_data)
    url = f"{s3}/{source.name}"
    pushed = kd(views_data, "cache", "push", str(source), url)
    assert pushed.exit_code == 0 and "ok:" in pushed.stderr, pushed.output  # verified on the server
    pulled = tmp_path / "pulled.zarr"
    assert kd(views_data, "cache", "pull", url, str(pulled)).exit_code == 0
    again = LogitStore.open(pulled)
    assert again.manifest.views == LogitStore.open(source).manifest.views
    np.testing.assert_array_equal(again.read_views(), LogitStore.open(source).read_views())
    paths = Paths(data=tmp_path / "elsewhere")  # only the bucket
    argv = ["distill", "--preset", "tiny", "--cache", url, "--epochs", "2", "--run-name", "s3"]
    result = kd(paths, *argv, *VIEW_ARGS)
    assert result.exit_code == 0, result.output
    assert "cached: 3 shift views" in (paths.runs / "s3" / "config.json").read_text()


@pytest.mark.slow
def test_one_pass_sweep_over_views_equals_sequential(views_data: Paths, tmp_path: Path) -> None:
    import json

    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(views_data.logits, paths.logits)
    grid = ["--grid", "temperature=2,4", "--grid", "epochs=2", *VIEW_ARGS]
    for mode in ("sequential", "one-pass"):
        result = kd(paths, "sweep", "--preset", "tiny", *grid, "--mode", mode, "--name", mode)
        assert result.exit_code == 0, result.output
    for run in sorted(p.name for p in (paths.data / "sweeps" / "sequential" / "runs").iterdir()):
        a, b = (
            paths.data / "sweeps" / mode / "runs" / run / "metrics.jsonl"
            for mode in ("sequential", "one-pass")
        )
        ma, mb = ([json.loads(line) for line in p.read_text().splitlines()] for p in (a, b))
        assert [m["val_accuracy"] for m in ma] == [m["val_accuracy"] for m in mb]
        assert "cached: 3 shift views" in (a.parent / "config.json").read_text()


def test_runs_saved_before_the_view_settings_existed_are_still_the_same_run() -> None:
    """A run folder written by an older kd (no view settings in its config.json) is recognised as the
    same experiment: rerunning it rewrites that folder instead of refusing it or orphaning the run."""
    from pipeline.runs.identity import used_settings

    preset = load_preset("mnist1d")
    old = preset.to_dict()
    del old["cache"]["augment"], old["cache"]["augment_pad"], old["cache"]["views"], old["cache"]["view_seed"]
    del old["distill"]["views"], old["distill"]["teacher_online"], old["distill"]["train"]["augment_pad"]
    assert used_settings(old) == used_settings(preset)
    # ... while a real change of views is a different run
    changed = with_overrides(preset, {"cache.augment": "shift", "cache.views": 4})
    assert used_settings(changed) != used_settings(preset)
    assert used_settings(with_overrides(changed, {"cache.views": 8})) != used_settings(changed)


def test_an_augmentation_alone_caches_every_view() -> None:
    """README: `cache.views` defaults to "all" (a few views per sample were measured to lose)."""
    preset = with_overrides(load_preset("tiny"), {"cache.augment": "crop-flip"})
    assert preset.cache.views_for("train")["count"] == 162 and preset.cache.views_for("train")["all"]
    assert preset.cache.views_for("test") == {}  # the test split is evaluated on fixed inputs
    shift = with_overrides(load_preset("tiny"), {"cache.augment": "shift", "cache.augment_pad": 8})
    assert shift.cache.views_for("train")["count"] == 17
    assert load_preset("tiny").cache.views_for("train") == {}  # no augmentation: the dense layout


@pytest.mark.slow
def test_a_view_cache_larger_than_the_memory_budget_streams(views_data: Paths, tmp_path: Path) -> None:
    import json

    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(views_data.logits, paths.logits)
    argv = [
        "distill",
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--run-name",
        "s",
        "--set",
        "distill.memory_budget_mb=0",
    ]
    result = kd(paths, *argv, *VIEW_ARGS, "--set", "distill.views=cycle")
    assert result.exit_code == 0, result.output
    config = json.loads((paths.runs / "s" / "config.json").read_text())
    assert config["batches"] == "cache streamed (shard-shuffled)"
    assert config["views"] == "cached: 3 shift views (pad 2), one per row per epoch (cycle)"
    summary = json.loads((paths.runs / "s" / "summary.json").read_text())
    assert summary["student_val_accuracy"] > 0.17  # measured 0.22-0.32 in memory (see above)
