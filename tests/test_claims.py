"""The README's behavioural claims, one test each (the claim is quoted in the test's docstring), written
to fail when the claim breaks: values against references computed here, not values the code wrote."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from pipeline.cache import check_matches
from pipeline.config import Paths, changed_settings, load_preset, resolve
from pipeline.data.datasets import load_split
from pipeline.distill.losses import LOSSES
from pipeline.distill.phases import phases
from pipeline.errors import KDError
from pipeline.models import load_checkpoint
from pipeline.runs.identity import default_run_name
from pipeline.store import LogitStore, ShardWriter
from stages import distill
from tests.conftest import cache_paths
from tests.factories import PRECISION, raw_logit_tolerance
from tests.test_cli import kd
from tests.test_store import make_manifest


def metrics_of(paths: Paths, run: str) -> list[dict]:
    return [json.loads(line) for line in (paths.runs / run / "metrics.jsonl").read_text().splitlines()]


def test_logits_are_stored_raw(tiny_data: Paths) -> None:
    """ "Raw logits only: never store softened probabilities" — the cache holds the teacher's forward pass."""
    teacher, _ = load_checkpoint(tiny_data.teachers / "tiny-cnn1d")
    teacher.eval()
    split = load_split(load_preset("tiny").dataset, "train")
    with torch.no_grad():
        expected = teacher(split.inputs).float()
    (train,) = cache_paths(tiny_data, "train")
    stored, _, ids = LogitStore.open(train).read_all()
    assert torch.equal(ids, split.ids)
    if PRECISION == "fp32":  # the CPU: exactly the float16 of the raw value
        torch.testing.assert_close(stored, expected.half().float(), rtol=0, atol=0)
    else:  # a GPU: the teacher ran under bf16 autocast
        torch.testing.assert_close(stored, expected, **raw_logit_tolerance(PRECISION))


def test_manifest_statistics_are_those_of_the_stored_logits(tiny_data: Paths) -> None:
    """`teacher_accuracy`, `logit_stats` (mean L2 norm, mean max-softmax) describe the stored logits."""
    (train,) = cache_paths(tiny_data, "train")
    store = LogitStore.open(train)
    logits, labels, _ = store.read_all()
    m = store.manifest
    assert m.teacher_accuracy == pytest.approx((logits.argmax(1) == labels).double().mean().item(), abs=2e-3)
    norm = torch.linalg.vector_norm(logits.double(), dim=1).mean().item()
    top = F.softmax(logits.double(), dim=1).max(dim=1).values.mean().item()
    assert m.logit_stats["mean_l2_norm"] == pytest.approx(norm, rel=1e-3)
    assert m.logit_stats["mean_max_softmax"] == pytest.approx(top, rel=1e-3)
    assert top > 1.5 / 10  # a trained teacher: far from the uniform 1/C a mean (not max) softmax gives


# method -> (overrides, the per-epoch values metrics.jsonl must show, written out by hand)
SCHEDULES = {
    "kd": (
        {"distill.temperature": 3.0, "distill.alpha": 0.7},
        {"temperature": [3.0, 3.0, 3.0, 3.0], "alpha": [0.7] * 4},
    ),
    "kd-linear": (
        {
            "distill.temperature": 4.0,
            "distill.temperature_schedule": "linear",
            "distill.temperature_end": 1.0,
            "distill.alpha": 0.5,
            "distill.alpha_schedule": "step",
            "distill.alpha_end": 0.8,
        },
        # linear over 4 epochs: 4 + (1 - 4) * e / 3; step of 4 levels: 0.5, 0.6, 0.7, 0.8
        {"temperature": [4.0, 3.0, 2.0, 1.0], "alpha": [0.5, 0.6, 0.7, 0.8]},
    ),
    "dkd": (
        {"distill.temperature": 2.0, "distill.dkd.warmup_epochs": 3},
        {"temperature": [2.0] * 4, "warmup": [1 / 3, 2 / 3, 1.0, 1.0]},
    ),
    "dist": ({"distill.temperature": 1.5}, {"temperature": [1.5] * 4}),
    "continuation": (
        {"distill.continuation.t_max": 2, "distill.continuation.psi_epochs": 2},
        # k = 4 // 2 = 2: T = 2, 2, 1, 1 -> phi = 1 - (T - 1) / 2; psi = min(e / 2, 1)
        {"phi": [0.5, 0.5, 1.0, 1.0], "psi": [0.0, 0.5, 1.0, 1.0], "temperature": [2, 2, 1, 1]},
    ),
    "annealing": (
        {"distill.annealing.tau_max": 2, "distill.annealing.phase1_epochs": 2},
        # tau 2 over 2 epochs: T = 2, 1 -> phi = 0.5, 1.0; then phase 2 (CE) has no phi
        {"phi": [0.5, 1.0, None, None], "temperature": [2, 1, None, None]},
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_the_schedules_used_each_epoch_are_logged(case: str, tiny_data: Paths) -> None:
    """ "The values used each epoch are written to metrics.jsonl" — and they are what the settings say."""
    method = case.split("-")[0]
    overrides, expected = SCHEDULES[case]
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    name = f"sched-{case}"
    result = kd(tiny_data, "distill", "--preset", "tiny", "--method", method, "--epochs", "4", *sets,
                "--run-name", name)  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = metrics_of(tiny_data, name)
    for key, values in expected.items():
        assert [m.get(key) for m in metrics] == pytest.approx(values), key


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "continuation", "annealing", "ce"])
def test_the_loop_calls_the_loss_with_the_logged_settings(method: str) -> None:
    """The loss a phase runs is LOSSES[method] with exactly the settings logged for that epoch."""
    cfg = resolve(
        "tiny", {"distill.method": method, "distill.temperature": 3.0, "distill.alpha": 0.6}
    ).distill
    zs, zt, y = torch.randn(8, 10), torch.randn(8, 10) * 3, torch.randint(0, 10, (8,))
    for phase in phases(cfg):
        for epoch in (0, 2, 5):
            settings = phase.settings(epoch)
            expected = LOSSES[phase.loss](zs, zt, y, **settings)
            assert torch.equal(phase.loss_at(epoch)(zs, zt, y), expected)
            if phase.loss in ("kd", "dkd", "dist"):
                assert settings["temperature"] == 3.0
            if phase.loss == "kd":
                assert settings["alpha"] == 0.6


def test_kd_learns_from_the_teacher_at_its_temperature(tiny_data: Paths) -> None:
    """kd = (1-α)·CE + α·T²·KL: at α = 0 it is the CE run exactly; the teacher and T change training."""

    def losses(name: str, *args: str) -> list[float]:
        result = kd(tiny_data, "distill", "--preset", "tiny", "--epochs", "2", "--run-name", name, *args)
        assert result.exit_code == 0, result.output
        return [m["train_loss"] for m in metrics_of(tiny_data, name)]

    ce = losses("ab-ce", "--method", "ce")
    assert losses("ab-a0", "--alpha", "0") == ce
    t1, t4 = losses("ab-t1", "--temperature", "1"), losses("ab-t4", "--temperature", "4")
    assert t1 != ce and t4 != ce and t1 != t4


def test_annealing_phase2_gets_a_fresh_optimizer(tiny_data: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "Phase 2: CE from the best phase-1 checkpoint, fresh optimizer and LR schedule"."""
    from pipeline.training import loop as train

    made: list[tuple[float, int]] = []
    real = train.make_optimizer

    def recording(model, cfg):  # noqa: ANN001, ANN202
        optimizer = real(model, cfg)
        made.append((cfg.lr, len(optimizer.state)))
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", recording)
    settings = {
        "distill.method": "annealing",
        "distill.annealing.phase1_epochs": 2,
        "distill.annealing.tau_max": 2,
        "distill.annealing.phase2_lr": 0.05,
        "distill.train.epochs": 3,
    }
    preset = resolve("tiny", settings)
    distill.run(preset, tiny_data, run_name="fresh-optimizer", verbose=False)
    assert made == [(3e-3, 0), (0.05, 0)]  # two optimizers, the second new (no state) at its own lr


def test_a_cache_with_another_class_count_is_refused(tiny_data: Paths, tmp_path: Path) -> None:
    """Stage 2 checks "that its length, dataset fingerprint and class count match the data in use"."""
    split = load_split(load_preset("tiny").dataset, "train")
    m = make_manifest()
    m = dataclasses.replace(
        m,
        dataset=dataclasses.replace(
            m.dataset, length=len(split), num_classes=5, fingerprint=split.fingerprint
        ),
    )
    store = LogitStore.create(tmp_path / "c.zarr", dataclasses.replace(m, storage=dataclasses.replace(
        m.storage, chunk_rows=256, shard_rows=256)))  # fmt: skip
    writer = ShardWriter(store)
    writer.add(torch.randn(len(split), 5), split.labels % 5, split.ids)
    writer.close()
    store.finish()
    with pytest.raises(KDError, match="has 5 classes but mnist1d has 10"):
        check_matches(LogitStore.open(store.where), split)


def test_complete_means_the_flag_and_every_shard(tmp_path: Path) -> None:
    """ "Complete (manifest flag *and* every shard marked done)": each half alone is refused."""
    store = LogitStore.create(tmp_path / "c.zarr", make_manifest())
    writer = ShardWriter(store)
    writer.add(torch.randn(21, 5), torch.zeros(21, dtype=torch.long), torch.arange(21))
    writer.close()
    assert store.shards_done().all() and not store.manifest.complete
    with pytest.raises(KDError, match="incomplete"):
        LogitStore.open(store.where).require_complete()  # every shard done, flag unset
    store.finish()
    LogitStore.open(store.where).require_complete()
    zarr.open_group(store.where, mode="r+")["done"][1] = False
    with pytest.raises(KDError, match="incomplete"):
        LogitStore.open(store.where).require_complete()  # flag set, a shard not done


def _consistently_damaged(tiny_data: Paths, tmp_path: Path) -> Path:
    """A valid file whose data no longer matches the checksum recorded in the manifest."""
    (train,) = cache_paths(tiny_data, "train")
    copy = tmp_path / train.name
    shutil.copytree(train, copy)
    zarr.open_group(copy, mode="r+")["logits"][300, 3] = 7.0
    return copy


def test_checksums_are_checked_on_every_read_path(tiny_data: Paths, tmp_path: Path) -> None:
    """ "Every shard's checksum as it loads": in memory and streamed."""
    store = LogitStore.open(_consistently_damaged(tiny_data, tmp_path))
    with pytest.raises(KDError, match="shard 1 fails its CRC32C"):
        store.read_all()
    with pytest.raises(KDError, match="shard 1 fails its CRC32C"):
        for _ in store.iter_buffers(torch.Generator().manual_seed(0)):
            pass


def _rewritten(folder: Path, relabel, ids: np.ndarray) -> LogitStore:  # noqa: ANN001
    """A store whose labels (relabel(true labels)) and ids are rewritten with matching checksums, under
    the manifest of the true labels: only verify's own id and accuracy checks can see what is wrong."""
    logits = torch.randn(21, 5)
    folder.mkdir(parents=True)
    store = LogitStore.create(folder / "v.zarr", make_manifest())
    writer = ShardWriter(store)
    writer.add(logits, logits.argmax(1), torch.arange(21))
    writer.close()
    store.finish()  # teacher accuracy 1.0 recorded
    labels = relabel(logits.argmax(1).numpy())
    for shard in range(store.num_shards):
        a, b = store.shard_range(shard)
        store.write_shard(shard, store.read("logits", a, b), labels[a:b], ids[a:b])
    manifest = dataclasses.replace(store.manifest, shard_crc32c=store.shard_checksums())
    store.group.attrs.put(manifest.to_dict())
    return LogitStore.open(store.where)


def test_verify_checks_ids_labels_shapes_and_dtypes(tmp_path: Path) -> None:
    """`kd cache verify` re-reads "checksums, shapes, dtypes, NaN/Inf, duplicate ids, teacher accuracy
    vs labels, completeness"."""
    same = np.arange(21)
    good = _rewritten(tmp_path / "a", lambda y: y, same)
    assert good.verify() == []
    dup = _rewritten(tmp_path / "b", lambda y: y, np.r_[np.arange(20), 3])
    assert any("sample ids repeat" in p for p in dup.verify())
    wrong = _rewritten(tmp_path / "c", lambda y: (y + 1) % 5, same)
    assert any("labels disagree with the manifest" in p for p in wrong.verify())
    group = zarr.open_group(good.where, mode="r+")
    del group["index"]
    group.create_array("index", shape=(21,), dtype="float64")
    assert any("array 'index' is float64" in p for p in LogitStore.open(good.where).verify())
    del group["labels"]
    group.create_array("labels", shape=(20,), dtype="int64")
    assert any("array 'labels' has shape (20,)" in p for p in LogitStore.open(good.where).verify())


def test_zip_members_cannot_leave_the_folder(tiny_data: Paths, tmp_path: Path) -> None:
    """ "Names cannot leave the cache root": a zip whose member climbs out is refused, nothing extracted."""
    (train,) = cache_paths(tiny_data, "train")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        for path in train.rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(train).as_posix())
        z.writestr("../escaped.txt", "out")
    result = kd(tiny_data, "cache", "pull", str(evil), str(tmp_path / "in" / "c.zarr"))
    assert result.exit_code == 2 and "would leave the cache folder" in result.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "in").exists()


def test_distill_prefers_the_cache_stored_as_the_preset_says(tiny_data: Paths, tmp_path: Path) -> None:
    """ "It finds the newest complete cache of the preset's teacher whose dataset fingerprint matches,
    stored as the preset says (dtype, codec, level) when there is one": a newer float32 dump of the same
    teacher does not take over `kd distill` (stage 1 reports a hit on the float16 cache), yet is used
    when it is the only one."""
    from tests.test_cli import kd

    paths = Paths(data=tmp_path / "data")
    shutil.copytree(tiny_data.teachers, paths.teachers)
    shutil.copytree(tiny_data.logits, paths.logits)
    (narrow,) = cache_paths(paths, "train")
    group = zarr.open_group(narrow, mode="r+")  # written a year ago: the float32 dump below is newer
    group.attrs.put({**group.attrs.asdict(), "created": "2025-11-26T00:00:00+00:00"})
    made = kd(paths, "teacher-logits", "--preset", "tiny", "--split", "train", "--set", "cache.dtype=float32")
    assert made.exit_code == 0, made.output
    (wide,) = [p for p in cache_paths(paths, "train") if p != narrow]
    assert LogitStore.open(wide).manifest.created > LogitStore.open(narrow).manifest.created

    first = distill.run(resolve("tiny", {"distill.train.epochs": 1}), paths, verbose=False)
    assert first["cache"] == str(narrow)
    shutil.rmtree(narrow)
    alone = distill.run(resolve("tiny", {"distill.train.epochs": 1}), paths, run_name="alone", verbose=False)
    assert alone["cache"] == str(wide)


def test_the_readme_run_name_example() -> None:
    """README "Outputs": `-<hash>` of any other setting changed, "e.g. `mnist1d-kd-T2-a0.9-s0-<hash>` for
    `--label-smoothing 0.1`"."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (named,) = re.findall(r"`(mnist1d-kd-T2-a0\.9-s0-[0-9a-f]{6})` for\s+`--label-smoothing 0\.1`", readme)
    preset = resolve("mnist1d", {"distill.label_smoothing": 0.1})
    assert default_run_name(preset, changed_settings(preset, "mnist1d")) == named


def test_kd_cache_dir_environment_variable(tiny_data: Paths, tmp_path: Path) -> None:
    """ "The cache root (`--cache-dir`, env `KD_CACHE_DIR`, default `data/logits`)"."""
    from stages.cli import app
    from tests.test_cli import runner

    root = tmp_path / "elsewhere"
    shutil.copytree(tiny_data.logits, root)
    env = {"KD_CACHE_DIR": str(root), "KD_DATA_DIR": str(tmp_path / "d")}
    result = runner.invoke(
        app, ["distill", "--preset", "tiny", "--epochs", "1", "--run-name", "env"], env=env
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "runs" / "env" / "summary.json").read_text())["cache"].startswith(
        str(root)
    )


def test_the_readme_bfloat16_snippet(tmp_path: Path) -> None:
    """README, "Reading bfloat16 logits without kd":
    `torch.from_numpy(g["logits"][:].view("int16")).view(torch.bfloat16)`."""
    store = LogitStore.create(tmp_path / "b.zarr", make_manifest("bfloat16"))
    logits = torch.randn(21, 5) * 4
    writer = ShardWriter(store)
    writer.add(logits, torch.zeros(21, dtype=torch.long), torch.arange(21))
    writer.close()
    g = zarr.open_group(tmp_path / "b.zarr", mode="r")
    read = torch.from_numpy(g["logits"][:].view("int16")).view(torch.bfloat16)
    assert torch.equal(read, logits.to(torch.bfloat16))


def test_imports_go_one_way() -> None:
    """ "Imports go one way: `stages` uses `pipeline`, never the reverse"."""
    offenders = []
    for path in Path(__file__).parents[1].joinpath("pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            offenders += [f"{path.name}: {n}" for n in names if n == "stages" or n.startswith("stages.")]
    assert offenders == []


@pytest.mark.slow
def test_kd_beats_scratch_on_the_default_preset(tmp_path: Path) -> None:
    """The README's headline: on MNIST-1D, Hinton KD (T=2, α=0.9) beats the scratch student on every seed."""
    from stages import teacher_logits, train_teacher

    paths = Paths(data=tmp_path)
    preset = resolve("mnist1d")
    train_teacher.run(preset, paths)
    teacher_logits.run(preset, paths)
    for seed in (0, 1, 2):
        kd_run = distill.run(resolve("mnist1d", {"distill.seed": seed}), paths, verbose=False)
        ce_run = distill.run(
            resolve("mnist1d", {"distill.seed": seed, "distill.method": "ce"}), paths, verbose=False
        )
        assert kd_run["student_test_accuracy"] > ce_run["student_test_accuracy"] + 0.01, seed
        assert kd_run["student_val_accuracy"] > ce_run["student_val_accuracy"], seed
    assert kd_run["teacher_test_accuracy"] > 0.93  # measured 95.0 here


def test_cache_import_checks_the_sample_ids(tiny_data: Paths, tmp_path: Path) -> None:
    """Import: "rows are joined to the dataset by id and checked (count, labels, ids)"."""
    (train,) = cache_paths(tiny_data, "train")
    out = tmp_path / "x.npz"
    assert kd(tiny_data, "cache", "export", str(train), "--format", "npz", "--out", str(out)).exit_code == 0
    with np.load(out, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["index"] = arrays["index"] + 100_000  # the same count and labels, other samples
    with (tmp_path / "other.npz").open("wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if k != "manifest"})
    paths = Paths(data=tmp_path / "d")
    result = kd(
        paths, "cache", "import", str(tmp_path / "other.npz"), "--preset", "tiny", "--teacher-name", "x"
    )
    assert result.exit_code == 2 and "its sample ids are not those of mnist1d/train" in result.stderr
    assert not paths.logits.exists() or not any(paths.logits.iterdir())
