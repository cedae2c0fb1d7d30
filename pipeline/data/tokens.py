"""Token files: a text tokenized once, streaming, into a flat uint16 / uint32 file (as nanoGPT's `.bin`
and Megatron's indexed datasets are), and the sequences of a split as windows into it.

    TokenFile.write(documents, tokenizer, path, eos)   # bounded memory: documents encoded in batches
    TokenWindows(file, seq_len, first, count, role)    # rows of (seq_len,) int64: inputs or labels

Window i holds tokens [i (L + 1), (i + 1)(L + 1)) of the stream: its inputs are the first L, its labels
the next-token targets (the last L). Past the end of the stream, inputs read the padding token and
labels -100 (never trained on, never counted). A window is read where it lies (a memmap), not through
DataLoader workers: slicing a mapped file is cheaper than a worker's round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.readers import SampleReader, row_positions

ENCODE_BATCH = 1024  # documents encoded at a time: what bounds the memory of tokenizing


@dataclass(frozen=True)
class TokenFile:
    """A flat file of token ids and what it holds (a JSON sidecar `<path>.json`)."""

    path: Path
    dtype: str  # "uint16" | "uint32"
    tokens: int
    documents: int
    digest: str  # sha256 of the file's bytes

    @staticmethod
    def write(
        documents: Iterable[str], tokenizer: Any, path: Path, eos: int, *, batch: int = ENCODE_BATCH
    ) -> TokenFile:
        """Encode `documents` (an iterable: nothing is held but one batch) into `path`, an end-of-text
        token after each; written to a temporary name, then renamed with its sidecar."""
        vocab = tokenizer.get_vocab_size()
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        digest, tokens, count = hashlib.sha256(), 0, 0
        try:
            with tmp.open("wb") as f:
                for docs in _batches(documents, batch):
                    ids = [tok for enc in tokenizer.encode_batch(docs) for tok in (*enc.ids, eos)]
                    block = np.asarray(ids, dtype=dtype).tobytes()
                    f.write(block)
                    digest.update(block)
                    tokens += len(ids)
                    count += len(docs)
            made = TokenFile(path, np.dtype(dtype).name, tokens, count, digest.hexdigest())
            tmp.with_suffix(".json.tmp").write_text(json.dumps(made.record()))
            tmp.replace(path)
            tmp.with_suffix(".json.tmp").replace(sidecar(path))
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".json.tmp").unlink(missing_ok=True)
        return made

    @staticmethod
    def read(path: Path) -> TokenFile | None:
        """The token file at `path` when it and its sidecar agree (size), else None."""
        try:
            record = json.loads(sidecar(path).read_text())
            made = TokenFile(
                Path(path),
                str(record["dtype"]),
                int(record["tokens"]),
                int(record["documents"]),
                str(record["digest"]),
            )
            if path.stat().st_size != made.tokens * np.dtype(made.dtype).itemsize:
                return None
            return made
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "tokens": self.tokens,
            "documents": self.documents,
            "digest": self.digest,
        }

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TokenWindows(SampleReader):
    """Rows `first .. first + count - 1` of a token file cut in windows of seq_len + 1: the inputs
    (`role = "inputs"`, the first seq_len tokens) or the labels (`"labels"`, the next tokens), int64."""

    kind = "tokens"
    dtype = torch.int64
    direct = True  # read where it lies, not through workers

    def __init__(
        self,
        file: TokenFile,
        seq_len: int,
        first: int,
        count: int,
        role: str,
        *,
        used: int,
        pad: int,
        pad_label: int,
    ) -> None:
        super().__init__(count, (seq_len,), workers=0)
        self.file, self.seq_len, self.first, self.role = file, seq_len, first, role
        self.used, self.pad, self.pad_label = used, pad, pad_label  # tokens of the stream in windows

    @property
    def tokens(self) -> np.ndarray:
        if getattr(self, "_tokens", None) is None:
            self._tokens = self.file.open()
        return self._tokens

    def name_of(self, i: int) -> str:
        return f"{self.file.path} (window {self.first + i})"

    def __getitem__(self, rows: Any) -> torch.Tensor:
        single = isinstance(rows, (int, np.integer))
        positions = row_positions([rows] if single else rows, self.num_rows).numpy()
        offset = 1 if self.role == "labels" else 0
        at = (
            (positions[:, None] + self.first) * (self.seq_len + 1) + offset + np.arange(self.seq_len)
        )  # (B, L)
        inside = at < self.used
        values = np.asarray(self.tokens[np.minimum(at, max(self.used - 1, 0))], dtype=np.int64)
        values[~inside] = self.pad_label if self.role == "labels" else self.pad
        out = torch.from_numpy(values)
        return out[0] if single else out

    def sample(self, i: int) -> torch.Tensor:
        return self[torch.tensor([i])][0]

    def content(self, progress: bool = True) -> str:  # the digest was taken as the file was written
        return self.file.digest
