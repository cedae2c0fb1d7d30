"""A dataset split as the stages hold it: inputs, labels, stable sample ids and a content fingerprint.

The sample ids are the join key between a dataset and a logit cache; the fingerprint (sha256 of ids,
labels and input bytes) is how stage 2 proves a cache was computed on the very data it trains on.
The builders by name are in pipeline.data.datasets.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.data.readers import SampleReader


@dataclass(frozen=True, eq=False)
class Split:
    dataset: str
    split: str
    inputs: torch.Tensor | SampleReader  # (N, ...) float32 in memory, or read by DataLoader workers
    labels: torch.Tensor | SampleReader  # (N,) int64; token windows (N, L) of a token file for sequences
    ids: torch.Tensor  # (N,) int64, stable sample ids: the cache's join key
    num_classes: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # a file-backed source's digest of its inputs and labels (pipeline.data.readers), hashed in place of
    # the decoded tensors: the same whether they were read into memory or are read by workers
    content: str | None = None
    files: SampleReader | None = None  # the reader of inputs read into memory (views are cut from files)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def task(self) -> str:
        """ "classification" (one label a row) or "sequence" (a label a token: language modelling); the
        same word as a cache's `Manifest.task` and the training loop's `Task.name`."""
        return "sequence" if self.labels.dim() == 2 else "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.dataset}/{self.split}/{tuple(self.inputs.shape)}".encode())
        if self.content is not None:  # the source's digest covers inputs and labels
            digest.update(np.ascontiguousarray(self.ids.numpy()).tobytes())
            digest.update(f"content:{self.content}".encode())
            return digest.hexdigest()
        for tensor in (self.ids, self.labels, self.inputs):
            assert isinstance(tensor, torch.Tensor)
            digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
        return digest.hexdigest()

    @property
    def view_source(self) -> Any:
        """What views are cut from: the image files of a file-backed source (held in memory or not), else
        the inputs themselves."""
        return self.files if self.files is not None else self.inputs

    @property
    def reading(self) -> str:
        """How a file-backed split's inputs are read, for the console ("" for one built in memory)."""
        reader = self.view_source
        if isinstance(reader, torch.Tensor):
            return ""
        how = (
            "read in this process"
            if reader.direct or reader.workers == 0
            else f"decoded by {reader.workers} DataLoader worker(s)"
        )
        rows = f"{self.split} inputs: {len(self)} {reader.kind} rows"
        if self.streamed:
            return f"{rows} {how} as batches ask (more than dataset.memory_budget_mb)"
        return f"{rows} held in memory (within dataset.memory_budget_mb), {how} once"

    @property
    def streamed(self) -> bool:
        """Whether the inputs are read by DataLoader workers as batches ask (not held in memory)."""
        return not isinstance(self.inputs, torch.Tensor)
