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

The text is tokenized once, streaming, into a flat token file (pipeline/data/tokens.py; kept in the
user's cache folder under a digest of the text and the tokenizer). Its stream is cut into windows of
seq_len + 1 tokens: inputs are the first seq_len, labels the next-token targets (the last seq_len). The
last 10% of the windows are the test split. The stream's last window is padded (labels -100: never
trained on, never counted). Sample ids are window numbers in the whole stream (the cache's join key);
the fingerprint covers the ids and the token file's bytes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import DatasetConfig
from pipeline.data.kept import keep, path_for
from pipeline.data.split import Split
from pipeline.data.tokens import TokenFile, TokenWindows
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


@dataclass(frozen=True)
class Documents:
    """A text as an iterable of documents, read again on each pass (a file streams: never held whole)."""

    read: Callable[[], Iterable[str]]
    origin: str  # where they came from, for the manifest
    identity: Any  # what the token file is keyed by: changes whenever the text may have

    def __iter__(self) -> Iterator[str]:
        return iter(self.read())


def read_documents(options: dict[str, Any]) -> Documents:
    """The documents of `options.text`: the built-in docstrings, a text file's paragraphs (split at blank
    lines, streamed) or a `datasets` source's column (Arrow, read in batches)."""
    text = str(options.get("text", DEFAULT_TEXT))
    if text == DEFAULT_TEXT:
        docs = python_docstrings()
        digest = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
        return Documents(
            lambda: docs, "docstrings of the Python standard library's top-level modules", digest
        )
    if text.startswith("hf:"):
        return _hf_documents(text[3:], str(options.get("column", "text")))
    path = Path(text).expanduser()
    if not path.is_file():
        raise KDError(
            f"dataset.options.text '{text}' is neither {DEFAULT_TEXT}, a text file nor hf:<datasets source>"
        )
    st = path.stat()
    return Documents(
        lambda: paragraphs(path),
        str(path),
        {"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns},
    )


def paragraphs(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """The non-blank parts of a UTF-8 text split at "\n\n" (as str.split), read a block at a time."""
    held = ""
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(block):
            parts = (held + chunk).split("\n\n")
            held = parts.pop()
            yield from (part for part in parts if part.strip())
    if held.strip():
        yield held


def _hf_documents(source: str, column: str) -> Documents:
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

    def read() -> Iterator[str]:  # Arrow, memory-mapped: a batch of rows at a time
        for batch in split.iter(batch_size=1024):
            yield from (str(t) for t in batch[column] if str(t).strip())

    identity = {"source": source, "column": column, "fingerprint": getattr(split, "_fingerprint", None)}
    return Documents(read, f"hf:{source} column {column}", identity)


def tokenizer_for(options: dict[str, Any], documents: Iterable[str]) -> Any:
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
    """The train and test splits (pipeline.data.datasets.Split) of a language-modelling text: windows
    into its token file (pipeline/data/tokens.py), made once per text and tokenizer and kept."""
    options = dict(cfg.options)
    seq_len = int(options.get("seq_len", 64))
    if seq_len < 2:
        raise KDError(f"dataset.options.seq_len must be at least 2, got {seq_len}")
    documents = read_documents(options)
    tokenizer = tokenizer_for(options, documents)
    eos = tokenizer.token_to_id(EOS)
    pad = tokenizer.token_to_id(PAD)
    if eos is None:
        eos = tokenizer.get_vocab_size() - 1
    pad = eos if pad is None else pad
    file = token_file(documents, tokenizer, eos)
    window = seq_len + 1
    count = -(-file.tokens // window)
    if cfg.num_samples:
        count = min(count, cfg.num_samples)
    used = min(file.tokens, count * window)  # tokens of the stream inside the windows
    num_test = max(1, count // 10)
    if count - num_test < 2:
        raise KDError(f"the text gives only {count} sequences of {seq_len} tokens: use more text")
    vocab = tokenizer.get_vocab_size()
    preprocessing = {
        "text": documents.origin,
        "documents": file.documents,
        "tokens": file.tokens,
        "tokenizer": str(options.get("tokenizer", "")) or f"byte-level BPE trained here, {vocab} tokens",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "inputs": f"(N, {seq_len}) int64 token ids; labels the next tokens, -100 at padding",
        "token_file": f"{file.dtype}, sha256 {file.digest[:16]}; window i = tokens [i (L+1), (i+1)(L+1))",
        "fingerprint": "ids, seq_len and the token file's bytes",
    }

    def split(name: str, first: int, rows: int) -> Split:
        def windows(role: str) -> TokenWindows:
            return TokenWindows(file, seq_len, first, rows, role, used=used, pad=pad, pad_label=PAD_LABEL)

        return Split(
            dataset="lm-text",
            split=name,
            inputs=windows("inputs"),
            labels=windows("labels"),
            ids=torch.arange(first, first + rows, dtype=torch.int64),
            num_classes=vocab,
            preprocessing=preprocessing,
            content=f"{file.digest}:{seq_len}:{used}:{pad}",
        )

    train, test = split("train", 0, count - num_test), split("test", count - num_test, num_test)
    return {"train": train, "test": test, "tokenizer": tokenizer}


def token_file(documents: Documents, tokenizer: Any, eos: int) -> TokenFile:
    """The token file of these documents and this tokenizer: kept (pipeline/data/kept.py) under a digest
    of both, written (streaming) when missing or damaged."""
    key = {
        "text": documents.identity,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": eos,
        "version": 1,
    }
    path = path_for("tokens", key, ".bin")
    found = TokenFile.read(path)
    if found is not None:
        return found
    try:
        return TokenFile.write(documents, tokenizer, path, eos)
    except OSError:  # a read-only home: written beside the data instead, for this run
        return TokenFile.write(documents, tokenizer, Path(tempfile.mkdtemp()) / path.name, eos)
