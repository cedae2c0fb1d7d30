"""Language-model teachers: the sparse token-level cache (top-k + exact tail, sampled tokens) and the
sequence losses computed from it (README "Language models")."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Paths, load_preset
from pipeline.data.datasets import load_split
from pipeline.distill.losses import cross_entropy, hinton_kd, kl_terms
from pipeline.distill.targets import SparseTargets
from pipeline.models import load_checkpoint
from pipeline.store import LogitStore
from pipeline.store.sparse import reduce_logits, sparse_record
from tests import cli_process
from tests.conftest import cache_paths, lm_cache
from tests.test_bad_inputs import assert_refused, run_kd, snapshot

ARRAYS = ("logits", "labels", "index", "topk_ids", "lse", "sampled_ids", "sampled_logits", "target_logit")


def sparse(z: torch.Tensor, labels: torch.Tensor, k: int, temps=(1.0, 2.0), samples: int = 0, seed: int = 0):
    entry = sparse_record(k, temps, samples, seed, z.shape[1], z.shape[-1])
    values, extras, _ = reduce_logits(z, labels, torch.arange(len(z)), entry)
    return SparseTargets.from_arrays(values, {n: t.numpy() for n, t in extras.items()}, entry)


# -- losses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_top_k_with_k_equal_to_the_vocabulary_is_the_dense_loss(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    z, s = 3 * torch.randn(3, 5, 40, generator=g), 3 * torch.randn(3, 5, 40, generator=g)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    dense = kl_terms(s, z, t)
    full = sparse(z, labels, k=40)
    for target in ("topk-tail", "topk"):
        torch.testing.assert_close(kl_terms(s, full, t, target=target), dense, atol=1e-4, rtol=1e-4)
    some = sparse(z, labels, k=8)
    assert not torch.allclose(kl_terms(s, some, t, target="topk"), dense, atol=1e-3)  # the biased baseline


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kept_tokens_and_the_tail_bucket_are_the_teachers_distribution(t: float) -> None:
    """At a stored temperature the kept probabilities are exact and the tail holds exactly the rest."""
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(2, 6, 50, generator=g)
    targets = sparse(z, torch.zeros(2, 6, dtype=torch.long), k=5)
    p_kept = (targets.values / t - targets.lse_at(t)[..., None]).exp()
    p = torch.softmax(z / t, -1)
    torch.testing.assert_close(p_kept, p.gather(-1, targets.ids), atol=1e-5, rtol=1e-4)
    tail = 1 - p_kept.sum(-1)
    torch.testing.assert_close(tail, p.sum(-1) - p.gather(-1, targets.ids).sum(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_kept.sum(-1) + tail, torch.ones(2, 6))
    assert (tail > 1e-3).all()  # a real tail: k = 5 of 50


def test_the_uniform_tail_approximation_is_exact_for_a_flat_tail() -> None:
    z = torch.full((1, 1, 30), -1.0)
    z[..., :4] = torch.tensor([5.0, 3.0, 2.0, 1.0])
    targets = sparse(z, torch.zeros(1, 1, dtype=torch.long), k=4, temps=(1.0,))
    assert not targets.has_temperature(3.0)
    torch.testing.assert_close(targets.lse_at(3.0), torch.logsumexp(z / 3.0, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_the_sampled_estimators_gradient_averages_to_the_dense_gradient(t: float) -> None:
    """4,000 independent draws of S = 4 tokens of one teacher row: the mean gradient of the sampled loss
    w.r.t. the student's logits matches the dense KD gradient (fixed seed; the tolerance is ~5 standard
    errors of the mean, measured)."""
    g = torch.Generator().manual_seed(2)
    z = 2 * torch.randn(1, 1, 20, generator=g)
    s = torch.randn(1, 1, 20, generator=g)
    student = s.clone().requires_grad_(True)
    kl_terms(student, z, t).sum().backward()
    dense = student.grad.clone()
    many = z.expand(4000, 1, 20).contiguous()
    targets = sparse(many, torch.zeros(4000, 1, dtype=torch.long), k=3, samples=4, seed=7)
    assert len({tuple(r) for r in targets.sampled_ids[:, 0].tolist()}) > 100  # the draws differ
    students = s.expand(4000, 1, 20).clone().requires_grad_(True)
    kl_terms(students, targets, t, target="sampled").sum().backward()
    sampled = students.grad.mean(0, keepdim=True)
    torch.testing.assert_close(sampled, dense, atol=0.02, rtol=0)
    biased = students.grad.clone().zero_()  # and the top-k baseline's gradient is off by much more
    students.grad = None
    kl_terms(students, targets, t, target="topk").sum().backward()
    biased = students.grad.mean(0, keepdim=True)
    assert (biased - dense).abs().max() > 0.05


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_hard_label_term_is_torchs_cross_entropy(smoothing: float) -> None:
    g = torch.Generator().manual_seed(4)
    s, labels = torch.randn(3, 5, 40, generator=g), torch.randint(0, 40, (3, 5), generator=g)
    labels[0, 2:] = -100
    expected = torch.nn.functional.cross_entropy(
        s.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=smoothing
    )
    torch.testing.assert_close(cross_entropy(s, None, labels, label_smoothing=smoothing), expected)


def test_padding_never_contributes() -> None:
    g = torch.Generator().manual_seed(3)
    z, s = torch.randn(2, 6, 30, generator=g), torch.randn(2, 6, 30, generator=g)
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[1, 3:] = -100
    targets = sparse(z, labels, k=6, samples=4)
    for target in ("topk-tail", "topk", "sampled"):
        base = hinton_kd(s, targets, labels, temperature=2.0, alpha=0.5, target=target)
        noisy = s.clone()
        noisy[1, 3:] += 100 * torch.randn(3, 30, generator=g)  # anything at padding positions
        assert torch.equal(hinton_kd(noisy, targets, labels, temperature=2.0, alpha=0.5, target=target), base)
        # the mean over real tokens only: the padded rows dropped give the same per-token loss
        real = hinton_kd(
            s[:1],
            targets.rows(torch.tensor([0]), torch.device("cpu")),
            labels[:1],
            temperature=2.0,
            alpha=0.5,
            target=target,
        )
        part = hinton_kd(
            s[1:, :3], _cut(targets, 1, 3), labels[1:, :3], temperature=2.0, alpha=0.5, target=target
        )
        torch.testing.assert_close(base, (6 * real + 3 * part) / 9)


def _cut(targets: SparseTargets, row: int, length: int) -> SparseTargets:
    def cut(t):
        return None if t is None else t[row : row + 1, :length]

    return SparseTargets(
        cut(targets.values),
        cut(targets.ids),
        cut(targets.lse),
        targets.temperatures,
        targets.vocab,
        cut(targets.sampled_ids),
        cut(targets.sampled_logits),
    )


# -- stage 1 and stage 2 on the tiny language-model preset ------------------------------------------


@pytest.mark.slow
def test_stage_1_stores_the_teachers_top_k_logsumexp_and_samples(lm_data: Paths) -> None:
    store = LogitStore.open(lm_cache(lm_data))
    m = store.manifest
    assert m.format["version"] == 4 and m.layout == "sparse" and store.row_shape == (16, 8)
    assert m.sparse["k"] == 8 and m.sparse["lse_temperatures"] == [1.0, 2.0] and m.sparse["samples"] == 8
    values, labels, ids, extras = store.read_everything()
    split = load_split(load_preset("tiny-lm").dataset, "train")
    assert torch.equal(ids, split.ids) and torch.equal(labels, split.labels)
    teacher, _ = load_checkpoint(lm_data.teachers / "tiny-gpt")
    with torch.no_grad():
        z = teacher.eval()(split.inputs).float()
    top, top_ids = z.topk(8, -1)
    torch.testing.assert_close(values, top, atol=2e-2, rtol=2e-3)  # float16 of the raw values
    agree = (torch.from_numpy(extras["topk_ids"].astype(np.int64)) == top_ids).float().mean()
    assert agree > 0.99  # float16 ties aside
    lse = torch.stack([torch.logsumexp(z, -1), torch.logsumexp(z / 2, -1)], -1)
    torch.testing.assert_close(torch.from_numpy(extras["lse"]), lse, atol=1e-4, rtol=1e-5)
    target = z.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(torch.from_numpy(extras["target_logit"]), target, atol=1e-4, rtol=1e-5)
    drawn = torch.from_numpy(extras["sampled_ids"].astype(np.int64))
    torch.testing.assert_close(
        torch.from_numpy(extras["sampled_logits"].astype(np.float32)),
        z.gather(-1, drawn),
        atol=2e-2,
        rtol=2e-3,
    )
    assert extras["topk_ids"].dtype == np.uint16 and store.nbytes_stored() > 0
    nll = -(target - torch.logsumexp(z, -1))
    assert m.logit_stats["perplexity"] == pytest.approx(float(nll.mean().exp()), rel=1e-4)
    assert LogitStore.open(lm_cache(lm_data)).verify() == []


@pytest.mark.slow
def test_a_killed_sparse_dump_resumes_byte_identical(lm_data: Paths, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(lm_data.teachers, data / "teachers")
    argv = ["teacher-logits", "--preset", "tiny-lm", "--split", "train", "--device", "cpu"]
    env = {**os.environ, "KD_DATA_DIR": str(data), "TQDM_DISABLE": "1", "KD_FAULT_AFTER_SHARDS": "2"}
    killed = cli_process.run(argv, env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env.pop("KD_FAULT_AFTER_SHARDS")
    resumed = cli_process.run(argv, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "2/4 shards done" in resumed.stderr
    (again,) = cache_paths(Paths(data=data), "train", teacher="tiny-gpt")
    assert again.name == lm_cache(lm_data).name
    mine = {
        str(p.relative_to(again)): p.read_bytes()
        for n in ARRAYS
        for p in sorted((again / n).rglob("*"))
        if p.is_file()
    }
    theirs = {
        str(p.relative_to(lm_cache(lm_data))): p.read_bytes()
        for n in ARRAYS
        for p in sorted((lm_cache(lm_data) / n).rglob("*"))
        if p.is_file()
    }
    assert mine == theirs and len(mine) >= len(ARRAYS)


@pytest.mark.slow
def test_a_two_process_sparse_dump_is_byte_identical(lm_data: Paths, tmp_path: Path) -> None:
    from tests.test_distributed import torchrun

    data = tmp_path / "ddp"
    shutil.copytree(lm_data.teachers, data / "teachers")
    result = torchrun(data, "teacher-logits", "--preset", "tiny-lm", "--split", "train")
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = lm_cache(lm_data), lm_cache(Paths(data=data))
    assert single.name == double.name
    for name in ARRAYS:
        mine = {
            p.relative_to(double): p.read_bytes() for p in sorted((double / name).rglob("*")) if p.is_file()
        }
        assert mine == {
            p.relative_to(single): p.read_bytes() for p in sorted((single / name).rglob("*")) if p.is_file()
        }


@pytest.mark.slow
def test_every_target_trains_and_reports_perplexity(lm_data: Paths, tmp_path: Path) -> None:
    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(lm_data.teachers, paths.teachers)
    shutil.copytree(lm_data.logits, paths.logits)
    runs = {
        "ce": ["--method", "ce"],
        "tail": ["--set", "distill.sparse_target=topk-tail", "--temperature", "2"],
        "topk": ["--set", "distill.sparse_target=topk"],
        "sampled": ["--set", "distill.sparse_target=sampled"],
        "online": ["--online"],
        "approx": ["--temperature", "3"],
    }
    for name, args in runs.items():
        result = kd(paths, "distill", "--preset", "tiny-lm", "--run-name", name, "--device", "cpu", *args)
        assert result.exit_code == 0, result.output
        summary = json.loads((paths.runs / name / "summary.json").read_text())
        assert 1 < summary["student_test_perplexity"] < 300  # a vocabulary of 300: chance is 300
        metrics = [json.loads(line) for line in (paths.runs / name / "metrics.jsonl").open()]
        assert len(metrics) == 3 and all(m["val_perplexity"] > 1 for m in metrics)
        if name != "ce":
            assert summary["teacher_test_perplexity"] == pytest.approx(
                LogitStore.open(lm_cache(lm_data, "test")).manifest.logit_stats["perplexity"], rel=1e-3
            )
    assert [m["temperature"] for m in map(json.loads, (paths.runs / "tail" / "metrics.jsonl").open())] == [
        2.0
    ] * 3
    config = json.loads((paths.runs / "approx" / "config.json").read_text())
    assert config["approximated_temperatures"] == [3.0] and "uniform tail" in config["approximation"]
    assert json.loads((paths.runs / "tail" / "config.json").read_text())["approximated_temperatures"] == []
    tail = json.loads((paths.runs / "tail" / "summary.json").read_text())
    assert tail["sparse_target"] == "topk-tail" and tail["cache_bytes_per_token"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--temperature", "3", "--set", "distill.sparse_exact=true"],
            "has the full logsumexp at T = 1, 2 only, not at T = 3 (distill.sparse_exact = true)",
        ),
        (
            ["--set", "dataset.options.seq_len=8", "--cache", "CACHE"],
            "holds sequences of 16 tokens but dataset.options.seq_len is 8",
        ),
        (
            ["--set", "student.arch=hf-lm:OTHER", "--set", "student.options={}"],
            "has a vocabulary of 500 tokens but the data's tokenizer (byte-level BPE trained here, 300",
        ),
        (["--method", "dist"], "method 'dist' is for classification"),
        (  # the preset's GPT options handed to a Hugging Face model
            ["--set", "student.arch=hf-lm:OTHER"],
            "it takes no option 'layers' (options written for another architecture? clear them with",
        ),
    ],
)
def test_language_model_refusals_are_one_line(
    lm_data: Paths, tmp_path: Path, args: list[str], message: str
) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(
        GPT2Config(
            vocab_size=500,
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    ).save_pretrained(other)
    data = tmp_path / "data"
    shutil.copytree(lm_data.data, data)
    args = [a.replace("CACHE", str(lm_cache(Paths(data=data)))).replace("OTHER", str(other)) for a in args]
    before = snapshot(data)
    result = run_kd(data, "distill", "--preset", "tiny-lm", "--device", "cpu", *args)
    assert_refused(result, message)
    assert snapshot(data) == before  # nothing written


@pytest.mark.slow
def test_a_sweep_ranks_language_models_by_perplexity_and_its_best_command_reproduces_it(
    lm_data: Paths, tmp_path: Path
) -> None:
    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(lm_data.teachers, paths.teachers)
    shutil.copytree(lm_data.logits, paths.logits)
    args = [
        "sweep",
        "--preset",
        "tiny-lm",
        "--grid",
        "temperature=1,2",
        "--grid",
        "sparse_target=topk-tail,topk",
    ]
    result = kd(paths, *args, "--name", "lm", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = paths.data / "sweeps" / "lm"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["distill.temperature"], r["distill.sparse_target"]) for r in rows} == {
        ("1", "topk-tail"),
        ("2", "topk-tail"),
        ("1", "topk"),
        ("2", "topk"),
    }
    ppl = {r["label"]: float(r["student_val_perplexity"]) for r in rows}
    assert len(set(ppl.values())) == 4  # the settings reached the loss: four different students
    best = json.loads((out / "best.json").read_text())
    assert best["best"]["label"] == min(ppl, key=ppl.get)  # lower perplexity is better
    table = (out / "results.md").read_text().split("| combination |")[1].splitlines()[2:]
    assert [line.split(" | ")[0].strip("| ") for line in table if line.startswith("|")] == sorted(
        ppl, key=ppl.get
    )
    assert (out / "perplexity_vs_temperature.png").read_bytes()[:4] == b"\x89PNG"
    # the command the report gives trains the same student
    command = best["command"].split()
    assert command[:4] == ["kd", "distill", "--preset", "tiny-lm"]
    again = kd(paths, *command[1:], "--run-name", "again", "--device", "cpu")
    assert again.exit_code == 0, again.output
    summary = json.loads((paths.runs / "again" / "summary.json").read_text())
    (run,) = best["runs"]
    assert summary["student_val_perplexity"] == run["student_val_perplexity"] == ppl[best["best"]["label"]]
    assert summary["student_test_perplexity"] == run["student_test_perplexity"]

    rerun = kd(paths, *args, "--name", "lm", "--device", "cpu")
    assert rerun.exit_code == 0 and "skipping 4 finished runs" in rerun.stderr
    assert_refused(
        run_kd(paths.data, *args, "--name", "other", "--mode", "one-pass"),
        "--mode one-pass trains classifiers together; 'tiny-lm' is a language-model preset",
    )


@pytest.mark.slow
def test_compare_reports_language_model_targets_in_perplexity(lm_data: Paths, tmp_path: Path) -> None:
    from tests.test_cli import kd

    paths = Paths(data=tmp_path)
    shutil.copytree(lm_data.teachers, paths.teachers)
    shutil.copytree(lm_data.logits, paths.logits)
    only = ["--only", "ce", "--only", "top-8 + tail", "--only", "top-4 + tail"]
    result = kd(
        paths, "compare", "--preset", "tiny-lm", "--seeds", "1", *only, "--device", "cpu", "--name", "c"
    )
    assert result.exit_code == 0, result.output
    report = paths.data / "reports" / "c"
    text = (report / "report.md").read_text()
    assert "| configuration | method | test perplexity | val perplexity |" in text
    teacher = LogitStore.open(lm_cache(lm_data, "test")).manifest.logit_stats["perplexity"]
    assert f"| teacher | | {teacher:.2f} |" in text
    with (report / "results.csv").open() as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    for label, row in rows.items():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["student_test_perplexity"]) == summary["student_test_perplexity"]
        assert f"| {label} | {summary['method_label']} | {summary['student_test_perplexity']:.2f} |" in text
    top4 = json.loads((Path(rows["top-4 + tail"]["run_dir"]) / "summary.json").read_text())
    assert LogitStore.open(top4["cache"]).manifest.sparse["k"] == 4  # the compare built the k = 4 cache
    assert rows["ce"]["sparse_target"] == "" and rows["top-8 + tail"]["sparse_target"] == "topk-tail"
    assert (report / "comparison.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_sparse_cache_exports_imports_and_describes_itself(lm_data: Paths, tmp_path: Path) -> None:
    from tests.test_cli import kd

    out = tmp_path / "lm.npz"
    result = kd(lm_data, "cache", "export", str(lm_cache(lm_data)), "--format", "npz", "--out", str(out))
    assert result.exit_code == 0, result.output
    with np.load(out) as f:
        exported = {name: f[name] for name in f.files}
    _, _, _, extras = LogitStore.open(lm_cache(lm_data)).read_everything()
    for name, values in extras.items():  # nothing of the layout is left behind
        np.testing.assert_array_equal(exported[name], values)
    assert json.loads(str(exported["manifest"]))["sparse"]["k"] == 8
    other = Paths(data=tmp_path / "other")
    result = kd(other, "cache", "import", str(out), "--preset", "tiny-lm", "--teacher-name", "tiny-gpt")
    assert result.exit_code == 0, result.output
    (imported,) = cache_paths(other, "train", teacher="tiny-gpt")
    store = LogitStore.open(imported)
    assert (
        store.verify() == [] and store.manifest.sparse == LogitStore.open(lm_cache(lm_data)).manifest.sparse
    )
    back = store.read_everything()
    for name, values in extras.items():  # the round trip keeps every array
        np.testing.assert_array_equal(back[3][name], values)
    assert store.manifest.logit_stats["perplexity"] == pytest.approx(
        LogitStore.open(lm_cache(lm_data)).manifest.logit_stats["perplexity"], rel=1e-3
    )
    info = kd(lm_data, "cache", "info", str(lm_cache(lm_data)))
    assert info.exit_code == 0 and "per token of 16: top 8 of 300 logits (uint16 ids)" in info.output
    accuracy = LogitStore.open(lm_cache(lm_data)).manifest.teacher_accuracy
    assert f"teacher accuracy  {accuracy:.2%} of the next tokens on this train split\n" in info.output


@pytest.mark.slow
def test_torchrun_distills_a_language_model_like_one_process(lm_data: Paths, tmp_path: Path) -> None:
    """Two gloo processes split each global batch; the loss is weighted by each rank's share of the real
    tokens, so the per-epoch validation perplexity is that of one process (up to float summation order)."""
    from tests.test_cli import kd
    from tests.test_distributed import torchrun

    data = tmp_path / "ddp"
    shutil.copytree(lm_data.logits, data / "logits")
    argv = ["distill", "--preset", "tiny-lm", "--epochs", "2"]
    result = torchrun(data, *argv, "--run-name", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    one = kd(Paths(data=data), *argv, "--run-name", "one", "--device", "cpu")
    assert one.exit_code == 0, one.output

    def curve(name: str) -> list[float]:
        return [
            json.loads(line)["val_perplexity"] for line in (data / "runs" / name / "metrics.jsonl").open()
        ]

    assert curve("ddp") == pytest.approx(curve("one"), rel=1e-4)
    assert json.loads((data / "runs" / "ddp" / "config.json").read_text())["mode"] == "ddp x2"
    assert sorted(p.name for p in (data / "runs").iterdir()) == ["ddp", "one"]
    # streamed: each process reads its own shards of every epoch, its loss weighted by its real tokens
    streamed = torchrun(data, *argv, "--run-name", "ddp-streamed", "--set", "distill.memory_budget_mb=0")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    config = json.loads((data / "runs" / "ddp-streamed" / "config.json").read_text())
    assert config["mode"] == "ddp x2" and config["batches"].startswith("cache streamed")
    assert len(curve("ddp-streamed")) == 2 and all(1 < p < 300 for p in curve("ddp-streamed"))


@pytest.mark.slow
def test_a_sparse_cache_pushes_pulls_and_trains_from_a_zip(lm_data: Paths, tmp_path: Path) -> None:
    from tests.test_cli import kd

    team = tmp_path / "team"
    result = kd(lm_data, "cache", "push", str(lm_cache(lm_data)), str(team))
    assert result.exit_code == 0, result.output
    (pushed,) = team.glob("*.zarr")
    assert LogitStore.open(pushed).verify() == []
    zipped = tmp_path / "lm.zip"
    result = kd(lm_data, "cache", "push", str(lm_cache(lm_data)), str(zipped))
    assert result.exit_code == 0, result.output
    paths = Paths(data=tmp_path / "student")
    result = kd(
        paths, "distill", "--preset", "tiny-lm", "--cache", str(zipped), "--run-name", "z", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((paths.runs / "z" / "summary.json").read_text())["cache"] == str(zipped)


@pytest.mark.slow
@pytest.mark.parametrize("command", [["teacher-logits"], ["distill", "--online"]])
def test_a_teacher_never_reads_text_tokenized_otherwise(
    lm_data: Paths, tmp_path: Path, command: list[str]
) -> None:
    """Other text gives a BPE of the same size with other ids: the teacher would score garbage (seen on a
    machine with another Python, whose docstrings differ). Refused in one line, nothing written."""
    text = tmp_path / "other.txt"
    text.write_text((Path(__file__).parents[1] / "README.md").read_text())
    data = tmp_path / "data"
    shutil.copytree(lm_data.teachers, data / "teachers")
    before = snapshot(data)
    result = run_kd(
        data, command[0], "--preset", "tiny-lm", *command[1:], "--set", f"dataset.options.text={text}"
    )
    assert_refused(result, "was trained with tokenizer")
    assert snapshot(data) == before


@pytest.mark.parametrize("kind", ["txt", "jsonl", "save_to_disk"])
def test_your_own_text_through_a_file_or_datasets(tmp_path: Path, kind: str) -> None:
    """dataset.options.text: a .txt file (documents between blank lines), or hf:<a datasets source>."""
    from pipeline.config import DatasetConfig
    from pipeline.data.lm_data import python_docstrings

    docs = python_docstrings()[:400]
    if kind == "txt":
        source = tmp_path / "docs.txt"
        source.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
        text = str(source)
    elif kind == "jsonl":
        source = tmp_path / "docs.jsonl"
        source.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
        text = f"hf:{source}"
    else:
        import datasets

        datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "docs"))
        text = f"hf:{tmp_path / 'docs'}"
    options = {"text": text, "vocab": 300, "seq_len": 16, "column": "body"}
    train = load_split(DatasetConfig(name="lm-text", num_samples=0, val_size=10, options=options), "train")
    assert train.inputs.shape[1] == 16 and train.num_classes == 300 and len(train) > 100
    assert train.preprocessing["documents"] == len(docs)
    assert torch.equal(train.labels[:, :-1], train.inputs[:, 1:])  # labels are the next tokens


def test_the_default_text_is_parsed_once_and_kept_until_python_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard library's docstrings (seconds of parsing) are kept in the user's cache folder: the
    next command reads the same list; another Python (or a changed module) parses again."""
    import ast

    from pipeline.data import lm_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = lm_data.python_docstrings()
    (kept,) = (tmp_path / "kd").glob("docstrings-*.json")
    assert len(parsed) > 1000 and json.loads(kept.read_text()) == parsed

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed again")

    monkeypatch.setattr(ast, "parse", no_parse)
    assert lm_data.python_docstrings() == parsed  # read back, not parsed
    kept.write_text('["half a file')  # damaged: parsed again (and kept again)
    with pytest.raises(AssertionError, match="parsed again"):
        lm_data.python_docstrings()
    monkeypatch.setattr(lm_data.sys, "version", "another python")
    with pytest.raises(AssertionError, match="parsed again"):
        lm_data.python_docstrings()


def padded_gpt(folder: Path, rows: int, tokenizer: Path | None) -> None:
    """A tiny GPT whose output table has `rows` rows, saved with (or without) a tokenizer.json."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=rows, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.json")


@pytest.mark.slow
def test_rows_past_the_tokenizers_vocabulary_are_padding(lm_data: Paths, tmp_path: Path) -> None:
    """Qwen-style checkpoints pad their output table past the tokenizer (151,936 or 152,064 rows for the
    same tokenizer): such a student trains on the data's vocabulary, its padded ids dropped; the same
    table without the data's tokenizer beside it is still refused."""
    from pipeline.config import ModelConfig
    from pipeline.models import build_model, load_checkpoint
    from tests.test_cli import kd

    tokenizer = lm_data.teachers / "tiny-gpt" / "tokenizer.json"
    padded = tmp_path / "padded"
    padded_gpt(padded, 320, tokenizer)  # the data's BPE has 300 tokens
    student = build_model(ModelConfig(arch=f"hf-lm:{padded}"), 300, (16,))
    assert student.vocab == 300 and student(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 300)
    paths = Paths(data=tmp_path / "data")
    shutil.copytree(lm_data.data, paths.data)
    args = [
        "distill",
        "--preset",
        "tiny-lm",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--set",
        "student.options={}",
    ]
    result = kd(paths, *args, "--set", f"student.arch=hf-lm:{padded}", "--run-name", "padded")
    assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "padded" / "summary.json").read_text())
    assert np.isfinite(summary["student_test_perplexity"])
    saved, _ = load_checkpoint(paths.runs / "padded" / "checkpoint", trusted_arch=f"hf-lm:{padded}")
    assert saved(torch.zeros(1, 16, dtype=torch.long)).shape[-1] == 300

    bare = tmp_path / "bare"
    padded_gpt(bare, 320, None)
    refused = kd(paths, *args, "--set", f"student.arch=hf-lm:{bare}", "--run-name", "bare")
    assert refused.exit_code == 2 and "has a vocabulary of 320 tokens" in refused.stderr
    assert "taken as padding only beside its tokenizer.json" in " ".join(refused.stderr.split())
