"""Dataset builders by name -> `Split`: inputs, labels, stable sample ids and a content fingerprint.

The sample ids are the join key between a dataset and a logit cache; the fingerprint (sha256 of ids,
labels and input bytes) is how stage 2 proves a cache was computed on the very data it trains on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import DatasetConfig
from pipeline.errors import KDError

SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class Split:
    dataset: str
    split: str
    inputs: torch.Tensor  # (N, ...) float32
    labels: torch.Tensor  # (N,) int64
    ids: torch.Tensor  # (N,) int64, stable sample ids: the cache's join key
    num_classes: int
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.dataset}/{self.split}/{tuple(self.inputs.shape)}".encode())
        for tensor in (self.ids, self.labels, self.inputs):
            digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
        return digest.hexdigest()


def load_split(cfg: DatasetConfig, split: str) -> Split:
    """The named split of the configured dataset (generated or read locally; deterministic)."""
    if split not in SPLITS:
        raise KDError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if cfg.name not in DATASETS:
        raise KDError(f"unknown dataset '{cfg.name}': choose one of {', '.join(sorted(DATASETS))}")
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _built:
        if len(_built) >= 4:  # a few datasets stay built: stages and tests ask for the same ones again
            _built.pop(next(iter(_built)))
        _built[key] = DATASETS[cfg.name](cfg)
    return _built[key][split]


_built: dict[str, dict[str, Split]] = {}


def validation_rows(num_rows: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_rows, val_rows) positions carved from a train split of `num_rows` rows."""
    if val_size >= num_rows:
        raise KDError(f"dataset.val_size ({val_size}) must be smaller than the train split ({num_rows} rows)")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _mnist1d(cfg: DatasetConfig) -> dict[str, Split]:
    """MNIST-1D (Greydanus 2020), generated locally: never `get_dataset()`, which tries a download."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    args.seed = cfg.seed
    data = make_dataset(args)
    num_train = len(data["y"])
    preprocessing = {"inputs": "mnist1d make_dataset x, float32, shape (40,)", "normalization": "none"}
    params = {"num_samples": cfg.num_samples, "seed": cfg.seed}

    def split(name: str, x: np.ndarray, y: np.ndarray, first_id: int) -> Split:
        return Split(
            dataset="mnist1d",
            split=name,
            inputs=torch.from_numpy(np.asarray(x, dtype=np.float32)),
            labels=torch.from_numpy(np.asarray(y, dtype=np.int64)),
            ids=torch.arange(first_id, first_id + len(y), dtype=torch.int64),
            num_classes=10,
            preprocessing={**preprocessing, "generator": params},
        )

    return {
        "train": split("train", data["x"], data["y"], 0),
        "test": split("test", data["x_test"], data["y_test"], num_train),
    }


def _synthetic_images(cfg: DatasetConfig) -> dict[str, Split]:
    """CIFAR-shaped synthetic images (default 3x32x32, 100 classes): a fixed random template per class
    plus noise, 80/20 train/test. For benchmarks and tests where no real images may be downloaded."""
    shape = tuple(cfg.options.get("shape", (3, 32, 32)))
    num_classes = int(cfg.options.get("num_classes", 100))
    generator = torch.Generator().manual_seed(cfg.seed)
    templates = torch.randn(num_classes, *shape, generator=generator)
    labels = torch.randint(0, num_classes, (cfg.num_samples,), generator=generator)
    inputs = templates[labels] + 1.5 * torch.randn(cfg.num_samples, *shape, generator=generator)
    num_train = int(0.8 * cfg.num_samples)
    preprocessing = {
        "inputs": f"synthetic class templates + N(0, 1.5^2) noise, float32, shape {list(shape)}",
        "normalization": "none",
        "generator": {"seed": cfg.seed, "num_classes": num_classes},
    }

    def split(name: str, rows: slice) -> Split:
        return Split(
            dataset="synthetic-images",
            split=name,
            inputs=inputs[rows].contiguous(),
            labels=labels[rows].contiguous(),
            ids=torch.arange(cfg.num_samples)[rows].contiguous(),
            num_classes=num_classes,
            preprocessing=preprocessing,
        )

    return {"train": split("train", slice(0, num_train)), "test": split("test", slice(num_train, None))}


DATASETS: dict[str, Callable[[DatasetConfig], dict[str, Split]]] = {
    "mnist1d": _mnist1d,
    "synthetic-images": _synthetic_images,
}
