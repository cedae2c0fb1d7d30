"""Hugging Face text: a tiny random BERT saved with save_pretrained as teacher and student, on a small
datasets.Dataset of generated text, fully offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Paths
from tests.test_cli import assert_one_line_error, kd

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "movie", "was", "very"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(words: list[str], folder: Path):  # noqa: ANN201
    """A BERT word-piece tokenizer over `words`. transformers 5 takes `vocab` (and silently ignores the
    `vocab_file` of 4.x, leaving only the special tokens: every word would be [UNK])."""
    from transformers import BertTokenizer, BertTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tokenizer = BertTokenizer(vocab=vocab)
    if len(tokenizer) != len(vocab):  # transformers 4.x
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert tokenizer.get_vocab() == vocab
    return tokenizer


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("text")
    _bert(root / "bert", WORDS)
    import random

    rng = random.Random(0)
    for split, n in (("train", 64), ("test", 24)):
        labels = [rng.randint(0, 1) for _ in range(n)]
        texts = [
            " ".join(["the", "movie", "was", rng.choice(WORDS[:4] if y else WORDS[4:8])]) for y in labels
        ]
        datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(root / split)
    return root


def preset(root: Path, max_length: int = 8) -> str:
    path = root / f"text-{max_length}.toml"
    bert, train, test = root / "bert", root / "train", root / "test"
    path.write_text(f"""
[dataset]
name = "hf-text"
val_size = 8
options = {{ train = "{train}", test = "{test}", tokenizer = "{bert}", max_length = {max_length} }}
[teacher]
name = "tiny-bert"
[teacher.model]
arch = "hf:{bert}"
[teacher.train]
epochs = 2
lr = 1e-3
batch_size = 16
[student]
arch = "hf:{bert}"
[cache]
batch_size = 16
[distill.train]
epochs = 2
lr = 1e-3
batch_size = 16
""")
    return str(path)


def test_tiny_bert_teacher_and_student(text_setup: Path, tmp_path: Path) -> None:
    paths = Paths(data=tmp_path)
    for args in (["train-teacher"], ["teacher-logits"], ["distill", "--run-name", "bert"]):
        result = kd(paths, *args, "--preset", preset(text_setup))
        assert result.exit_code == 0, result.output
    summary = json.loads((paths.runs / "bert" / "summary.json").read_text())
    cache = next(paths.logits.glob("tiny-bert.*.train.*.zarr"))
    assert summary["teacher"] == "tiny-bert" and summary["cache"] == str(cache)
    manifest = json.loads(kd(paths, "cache", "info", str(cache), "--json").stdout)
    assert manifest["preprocessing"]["tokenizer"] == str(text_setup / "bert")
    assert manifest["preprocessing"]["max_length"] == 8

    # another max length: stage 2 refuses the cache by name rather than training on misaligned tokens
    result = kd(paths, "distill", "--preset", preset(text_setup, 12), "--cache", str(cache))
    assert_one_line_error(result, "was tokenized with max_length 8, this dataset uses 12")


def test_hub_id_while_offline_is_a_one_line_error(text_setup: Path, tmp_path: Path) -> None:
    result = kd(
        Paths(data=tmp_path),
        "distill",
        "--preset",
        preset(text_setup),
        "--method",
        "ce",
        "--set",
        "student.arch=hf:no-such-org/no-such-model",
    )
    assert_one_line_error(result, "offline, pass the path of a local save_pretrained folder")


def test_csv_files_through_datasets(text_setup: Path, tmp_path: Path) -> None:
    import datasets

    files = {}
    for split in ("train", "test"):
        files[split] = tmp_path / f"{split}.csv"
        datasets.load_from_disk(str(text_setup / split)).to_csv(str(files[split]), index=False)
    path = tmp_path / "csv.toml"
    path.write_text(
        Path(preset(text_setup))
        .read_text()
        .replace(
            f'train = "{text_setup / "train"}", test = "{text_setup / "test"}"',
            f'format = "csv", train = "{files["train"]}", test = "{files["test"]}"',
        )
    )
    result = kd(
        Paths(data=tmp_path / "d"), "distill", "--preset", str(path), "--method", "ce", "--run-name", "csv"
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "d" / "runs" / "csv" / "config.json").read_text())
    assert config["preset"]["dataset"]["options"]["format"] == "csv"


def _bert(folder: Path, words: list[str], vocab_size: int | None = None) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True)
    config = BertConfig(
        vocab_size=vocab_size or len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    word_tokenizer(words, folder).save_pretrained(folder)
    return folder


def test_a_student_with_another_vocabulary_is_one_line(text_setup: Path, tmp_path: Path) -> None:
    """The student must share the teacher's tokenizer: a smaller embedding table (an IndexError before)
    or the same size with other ids both stop before training, naming both."""
    small = _bert(tmp_path / "small", WORDS[:3])  # 8 embeddings; the data has ids up to 16
    result = kd(Paths(data=tmp_path / "d"), "distill", "--preset", preset(text_setup), "--method", "ce",
                "--set", f"student.arch=hf:{small}")  # fmt: skip
    assert_one_line_error(result, f"the student '{small}' has a vocabulary of 8 tokens but the data")
    shuffled = _bert(tmp_path / "shuffled", list(reversed(WORDS)))  # same size, other ids
    result = kd(Paths(data=tmp_path / "d"), "distill", "--preset", preset(text_setup), "--method", "ce",
                "--set", f"student.arch=hf:{shuffled}")  # fmt: skip
    assert_one_line_error(result, f"the student '{shuffled}' uses another vocabulary (17 tokens) than the")


def test_many_unknown_tokens_warn(text_setup: Path, tmp_path: Path) -> None:
    import torch

    from pipeline.data.datasets import _unknown_fraction

    ids = torch.tensor([[[5, 1, 1, 0], [1, 1, 1, 0]], [[1, 6, 7, 8], [1, 1, 1, 1]]])  # unk id 1, pad 0
    assert _unknown_fraction(ids, 1) == pytest.approx(3 / 7)
    poor = _bert(tmp_path / "poor", WORDS[8:])  # knows "the movie was very" only
    path = tmp_path / "poor.toml"
    path.write_text(
        Path(preset(text_setup))
        .read_text()
        .replace(f'tokenizer = "{text_setup / "bert"}"', f'tokenizer = "{poor}"')
    )
    result = kd(Paths(data=tmp_path / "d"), "distill", "--preset", str(path), "--method", "ce",
                "--set", f"student.arch=hf:{poor}", "--epochs", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "of the train tokens are unknown to tokenizer" in result.stderr


def test_text_rows_read_as_batches_ask_equal_the_held_ones(text_setup: Path) -> None:
    """hf-text reads its Arrow rows and tokenizes them as batches ask (memory budget 0); held in memory
    they are the same tensors, with the same fingerprint; a changed row changes it."""
    import datasets as hf
    import torch

    from pipeline.config import DatasetConfig
    from pipeline.data import datasets
    from pipeline.data.arrow import ArrowText

    options = {
        "train": str(text_setup / "train"),
        "test": str(text_setup / "test"),
        "tokenizer": str(text_setup / "bert"),
        "max_length": 8,
    }
    streamed = datasets.load_split(
        DatasetConfig(name="hf-text", options=options, memory_budget_mb=0), "train"
    )
    held = datasets.load_split(DatasetConfig(name="hf-text", options=options), "train")
    assert isinstance(streamed.inputs, ArrowText) and torch.is_tensor(held.inputs)
    assert torch.equal(streamed.inputs[:], held.inputs) and held.inputs.shape == (64, 2, 8)
    rows = torch.tensor([5, 0, 63, 5])
    assert torch.equal(streamed.inputs[rows], held.inputs[rows])
    assert streamed.fingerprint == held.fingerprint and torch.equal(streamed.labels, held.labels)
    from pipeline.config import ModelConfig
    from pipeline.models import build_model, check_fits_data

    model = build_model(ModelConfig(arch=f"hf:{text_setup / 'bert'}"), 2, streamed.input_shape)
    check_fits_data(model, streamed, "student", "hf")  # reads a sample of the rows, not all of them
    changed = hf.load_from_disk(str(text_setup / "train"))
    changed = changed.map(
        lambda row, i: {"text": row["text"] + (" very" if i == 3 else "")}, with_indices=True
    )
    changed.save_to_disk(str(text_setup / "train-changed"))
    other = datasets.load_split(
        DatasetConfig(name="hf-text", options={**options, "train": str(text_setup / "train-changed")}),
        "train",
    )
    assert other.fingerprint != held.fingerprint
