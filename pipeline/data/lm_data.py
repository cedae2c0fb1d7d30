"""Language-modelling data: text -> a byte-level BPE tokenizer -> fixed-length token sequences.

    dataset.name = "lm-text"
    dataset.options.text      = "python-docstrings" (default) | a local .txt file | a `datasets` source
    dataset.options.tokenizer = "" (train a BPE here, deterministic) | a tokenizer.json | an HF folder
    dataset.options.vocab     = 2048   (a BPE trained here)
    dataset.options.seq_len   = 64

The default text is on every machine that runs Python: the docstrings of the standard library's top-level
modules (about 0.9 MB of English in Python 3.12), read with `ast` in sorted file order. A `datasets`
source is a local text/json/parquet file or `save_to_disk` folder, or a hub name where the hub is
reachable (`dataset.options.text = "hf:<name or path>"`, column `dataset.options.column`, default "text").

The token stream is cut into sequences of seq_len + 1 tokens: inputs are the first seq_len, labels the
next-token targets (the last seq_len). The last 10% of the stream is the test split. The stream's last
sequence is padded (labels -100: never trained on, never counted). Sample ids are sequence positions in
the whole stream (the cache's join key); the fingerprint covers every token id.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

from pipeline.config import DatasetConfig
from pipeline.data.kept import keep, path_for
from pipeline.data.split import Split
from pipeline.errors import KDError
from pipeline.store.sparse import PAD_LABEL

DEFAULT_TEXT = "python-docstrings"
OPTIONS = frozenset({"text", "tokenizer", "vocab", "seq_len", "column"})
EOS, PAD = "<|endoftext|>", "<|pad|>"


def python_docstrings() -> list[str]:
    """The docstrings of the standard library's top-level modules (module, classes, functions), in sorted
    file order: real English present wherever Python is, no download. Parsing ~200 modules takes seconds,
    so the list is kept (pipeline/data/kept.py) under a digest of the Python version and every module's name,
    size and modification time: any change parses again."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    stats = [(path.name, path.stat()) for path in files]
    stamp = [sys.version] + [f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats]
    kept = path_for("docstrings", stamp, ".json")
    try:
        docs = json.loads(kept.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return docs
    except (OSError, ValueError):  # not kept yet, or unreadable: parsed again below
        pass
    docs = _parse_docstrings(files)
    keep(kept, lambda tmp: tmp.write_text(json.dumps(docs), encoding="utf-8"))
    return docs


def _parse_docstrings(files: list[Path]) -> list[str]:
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


def read_documents(options: dict[str, Any]) -> tuple[list[str], str]:
    """(documents, a description of where they came from)."""
    text = str(options.get("text", DEFAULT_TEXT))
    if text == DEFAULT_TEXT:
        return python_docstrings(), "docstrings of the Python standard library's top-level modules"
    if text.startswith("hf:"):
        return _hf_documents(text[3:], str(options.get("column", "text")))
    path = Path(text).expanduser()
    if not path.is_file():
        raise KDError(
            f"dataset.options.text '{text}' is neither {DEFAULT_TEXT}, a text file nor hf:<datasets source>"
        )
    return [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()], str(path)


def _hf_documents(source: str, column: str) -> tuple[list[str], str]:
    import datasets

    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
        elif Path(source).is_file():
            kind = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
                Path(source).suffix, "text"
            )
            data = datasets.load_dataset(kind, data_files=source)
        else:
            data = datasets.load_dataset(source)
    except Exception as err:  # offline hub lookups, unreadable files
        raise KDError(
            f"cannot load the text '{source}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}): "
            "offline, pass a local text/json/parquet file or a save_to_disk folder"
        ) from None
    split = data["train"] if isinstance(data, datasets.DatasetDict) else data
    if column not in split.column_names:
        raise KDError(f"'{source}' has no column '{column}' (it has {', '.join(split.column_names)})")
    return [str(t) for t in split[column] if str(t).strip()], f"hf:{source} column {column}"


def tokenizer_for(options: dict[str, Any], documents: list[str]) -> Any:
    """A `tokenizers.Tokenizer`: loaded (tokenizer.json, or an HF folder holding one), or a byte-level BPE
    of `options.vocab` tokens trained here on the documents (deterministic: the same text gives the same
    merges, so every machine builds the same tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    name = str(options.get("tokenizer", ""))
    if name:
        path = Path(name).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise KDError(f"dataset.options.tokenizer: no tokenizer.json at {path}")
        return Tokenizer.from_file(str(path))
    vocab = int(options.get("vocab", 2048))
    if not 300 <= vocab <= 65_536:
        raise KDError(f"dataset.options.vocab must be between 300 and 65536, got {vocab}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def tokenizer_file_fingerprint(path: Path) -> str:
    """tokenizer_fingerprint of a saved tokenizer.json (as the data records it)."""
    from tokenizers import Tokenizer

    return tokenizer_fingerprint(Tokenizer.from_file(str(path)))


def lm_text(cfg: DatasetConfig) -> dict[str, Any]:
    """The train and test splits (pipeline.data.datasets.Split) of a language-modelling text."""
    options = dict(cfg.options)
    seq_len = int(options.get("seq_len", 64))
    if seq_len < 2:
        raise KDError(f"dataset.options.seq_len must be at least 2, got {seq_len}")
    documents, origin = read_documents(options)
    tokenizer = tokenizer_for(options, documents)
    eos = tokenizer.token_to_id(EOS)
    pad = tokenizer.token_to_id(PAD)
    if eos is None:
        eos = tokenizer.get_vocab_size() - 1
    pad = eos if pad is None else pad
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        stream.extend(encoding.ids)
        stream.append(eos)
    tokens = torch.tensor(stream, dtype=torch.int64)
    window = seq_len + 1
    count = -(-len(tokens) // window)
    if cfg.num_samples:
        count = min(count, cfg.num_samples)
    padded = torch.full((count * window,), pad, dtype=torch.int64)
    used = tokens[: count * window]
    padded[: len(used)] = used
    rows = padded.view(count, window)
    labels = rows[:, 1:].clone()
    real = len(used) - 1  # positions 0..real-1 of the stream have a real next token
    positions = torch.arange(count * window).view(count, window)[:, :-1]
    labels[positions >= real] = PAD_LABEL
    num_test = max(1, count // 10)
    if count - num_test < 2:
        raise KDError(f"the text gives only {count} sequences of {seq_len} tokens: use more text")
    vocab = tokenizer.get_vocab_size()
    preprocessing = {
        "text": origin,
        "documents": len(documents),
        "tokens": len(tokens),
        "tokenizer": str(options.get("tokenizer", "")) or f"byte-level BPE trained here, {vocab} tokens",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "inputs": f"(N, {seq_len}) int64 token ids; labels the next tokens, -100 at padding",
    }

    def split(name: str, part: slice) -> Split:
        ids = torch.arange(count, dtype=torch.int64)[part]
        return Split(
            dataset="lm-text",
            split=name,
            inputs=rows[part, :-1].contiguous(),
            labels=labels[part].contiguous(),
            ids=ids,
            num_classes=vocab,
            preprocessing=preprocessing,
        )

    train, test = slice(0, count - num_test), slice(count - num_test, count)
    return {"train": split("train", train), "test": split("test", test), "tokenizer": tokenizer}
