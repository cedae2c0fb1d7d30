"""Hugging Face `datasets` sources (Arrow, memory-mapped): rows read as batches ask, never a column
copied into a list.

    dataset.name = "hf-text"     text columns, tokenized by the model's tokenizer per batch of rows
    dataset.name = "hf-images"   an image column, decoded per sample by DataLoader workers (as imagefolder)

Both read `load_from_disk` folders (options.train / .test), csv / json / parquet files (options.format
with train / test) or a hub name (options.hub [+ config]) where the hub is reachable. Sample ids are row
numbers, test rows after train rows. The fingerprint covers the ids, the labels, the datasets
fingerprint of the rows (which `datasets` derives from their files) and the reading settings (tokenizer
and max length, or the image recipe).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from pipeline.data.readers import ImageReader, SampleReader, decode_image, row_positions
from pipeline.errors import KDError

SPLITS = ("train", "test")
BATCH = 1024  # rows read from Arrow at a time (labels, the unknown-token check)


def load_parts(options: dict[str, Any], name: str) -> dict[str, Any]:
    """{"train", "test"}: `datasets.Dataset`s of the configured source (Arrow, memory-mapped)."""
    import datasets as hf

    o = options
    try:
        if "hub" in o:
            loaded = hf.load_dataset(str(o["hub"]), o.get("config"))
            return {"train": loaded["train"], "test": loaded[str(o.get("test_split", "test"))]}
        if "format" in o:
            files = {"train": str(o["train"]), "test": str(o["test"])}
            loaded = hf.load_dataset(str(o["format"]), data_files=files)
            return {"train": loaded["train"], "test": loaded["test"]}
        if "disk" in o or "train" in o:
            return {split: hf.load_from_disk(str(o[split])) for split in SPLITS}
    except Exception as err:  # offline hub lookups, missing files
        raise KDError(
            f"cannot load the data of '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "offline, pass local paths (csv/json/parquet files or save_to_disk folders)"
        ) from None
    raise KDError(f"dataset '{name}' needs options.hub, options.format + train/test, or train/test folders")


def column_values(rows: Any, column: str) -> np.ndarray:
    """One column of every row, read from Arrow a batch at a time (labels: 8 bytes a row)."""
    if column not in rows.column_names:
        raise KDError(f"the data has no column '{column}' (it has {', '.join(rows.column_names)})")
    parts = [np.asarray(batch[column]) for batch in rows.select_columns([column]).iter(batch_size=BATCH)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of a tokenizer's definition (a fast tokenizer's JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def content_of(rows: Any, labels: np.ndarray, settings: dict[str, Any]) -> str:
    """The digest a Split is fingerprinted by: the rows' datasets fingerprint, the labels, the settings."""
    digest = hashlib.sha256()
    digest.update(str(getattr(rows, "_fingerprint", None)).encode())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class ArrowText(SampleReader):
    """Rows of text columns tokenized as batches ask: (2, L) int64 [input_ids; attention_mask], padded
    to max_length. Read in this process (`direct`): a fast tokenizer encodes a batch on its own threads."""

    kind = "hf-text"
    dtype = torch.int64
    direct = True

    def __init__(self, rows: Any, columns: list[str], tokenizer: Any, max_length: int) -> None:
        super().__init__(len(rows), (2, max_length), workers=0)
        self.rows, self.columns, self.tokenizer, self.max_length = rows, columns, tokenizer, max_length

    def name_of(self, i: int) -> str:
        return f"row {i} of {self.kind}"

    def __getitem__(self, rows: Any) -> torch.Tensor:
        single = isinstance(rows, (int, np.integer))
        positions = row_positions([rows] if single else rows, self.num_rows).tolist()
        if not positions:
            return torch.empty((0, 2, self.max_length), dtype=torch.int64)
        picked = self.rows[positions]  # an Arrow gather of these rows
        encoded = self.tokenizer(
            *[list(picked[c]) for c in self.columns],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()  # (B, 2, L)
        return out[0] if single else out

    def sample(self, i: int) -> torch.Tensor:
        return self[torch.tensor([i])][0]

    def content(self, progress: bool = True) -> str:
        return str(getattr(self.rows, "_fingerprint", None))


class ArrowImages(ImageReader):
    """Rows of an image column (the bytes as stored, decoded with Pillow per sample in the workers)."""

    kind = "hf-images"

    def __init__(self, rows: Any, column: str, **settings: Any) -> None:
        from datasets import Image

        super().__init__(len(rows), **settings)
        if column not in rows.column_names:
            raise KDError(f"the data has no image column '{column}' (it has {', '.join(rows.column_names)})")
        self.rows, self.column = rows.cast_column(column, Image(decode=False)), column

    def name_of(self, i: int) -> str:
        value = self.rows[int(i)][self.column]
        where = value.get("path") if isinstance(value, dict) else None
        return f"row {i} ({where})" if where else f"row {i} of column '{self.column}'"

    def decoded(self, i: int) -> torch.Tensor:
        import io

        value = self.rows[int(i)][self.column]  # {"bytes", "path"}
        if value.get("bytes"):
            return decode_image(io.BytesIO(value["bytes"]))
        return decode_image(value["path"])

    def content(self, progress: bool = True) -> str:
        return str(getattr(self.rows, "_fingerprint", None))
