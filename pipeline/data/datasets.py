"""Dataset builders by name -> `Split`: inputs, labels, stable sample ids and a content fingerprint.

The sample ids are the join key between a dataset and a logit cache; the fingerprint (sha256 of ids,
labels and input bytes) is how stage 2 proves a cache was computed on the very data it trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import DatasetConfig
from pipeline.data.arrow import (
    ArrowImages,
    ArrowText,
    column_values,
    content_of,
    load_parts,
    tokenizer_digest,
)
from pipeline.data.kept import keep, path_for
from pipeline.data.lm_data import OPTIONS, lm_text
from pipeline.data.readers import IMAGE_SUFFIXES, ImageFiles, NpyRows, SampleReader, list_images, open_npy
from pipeline.data.split import Split
from pipeline.errors import KDError

SPLITS = ("train", "test")


def load_split(cfg: DatasetConfig, split: str) -> Split:
    """The named split of the configured dataset (generated or read locally; deterministic)."""
    if split not in SPLITS:
        raise KDError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if cfg.name not in DATASETS:
        raise KDError(f"unknown dataset '{cfg.name}': choose one of {', '.join(sorted(DATASETS))}")
    unknown = sorted(set(cfg.options) - DATASET_OPTIONS[cfg.name])
    if unknown:
        known = ", ".join(sorted(DATASET_OPTIONS[cfg.name])) or "none"
        top = [u for u in unknown if u in {f.name for f in dataclasses.fields(cfg)}]
        hint = (
            f" ({', '.join(f'dataset.{u}' for u in top)} is a dataset setting, not an option)" if top else ""
        )
        raise KDError(
            f"unknown dataset.options {', '.join(repr(u) for u in unknown)} for '{cfg.name}'{hint}: "
            f"its options are {known}"
        )
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _built:
        if len(_built) >= 4:  # a few datasets stay built: stages and tests ask for the same ones again
            _built.pop(next(iter(_built)))
        _built[key] = DATASETS[cfg.name](cfg)
    built = _built[key][split]
    readers = {name: getattr(built, name) for name in ("inputs", "labels")}
    readers = {name: r for name, r in readers.items() if isinstance(r, SampleReader)}
    if readers and sum(r.nbytes for r in readers.values()) <= cfg.memory_budget_mb * 2**20:
        # fits its budget: read whole once, through the workers (the fingerprint stays the files')
        loaded = {name: r.load() for name, r in readers.items()}
        files = readers.get("inputs")
        built = _built[key][split] = dataclasses.replace(built, **loaded, files=files)
    return built


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
    data = _kept_mnist1d(vars(args), lambda: make_dataset(args))
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


MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")


def _kept_mnist1d(args: dict[str, Any], generate: Callable[[], dict[str, Any]]) -> dict[str, np.ndarray]:
    """make_dataset's arrays, generated once per machine (~3.5 s for the default 5,000 samples, which
    every command would pay) and kept (pipeline/data/kept.py) under a digest of the generator's arguments
    and the mnist1d and numpy versions. A damaged file fails its zip CRC and is generated again."""
    from importlib.metadata import version

    kept = path_for("mnist1d", {"args": args, "mnist1d": version("mnist1d"), "numpy": np.__version__}, ".npz")
    try:
        with np.load(kept, allow_pickle=False) as z:
            return {name: z[name] for name in MNIST1D_ARRAYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # not kept yet, or damaged
        pass
    made = generate()
    data = {name: np.asarray(made[name]) for name in MNIST1D_ARRAYS}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **data)

    keep(kept, write)
    return data


def _synthetic_images(cfg: DatasetConfig) -> dict[str, Split]:
    """CIFAR-shaped synthetic images (default 3x32x32, 100 classes): a fixed random template per class
    plus noise, 80/20 train/test. For benchmarks and tests where no real images may be downloaded."""
    shape = tuple(cfg.options.get("shape", (3, 32, 32)))
    num_classes = int(cfg.options.get("num_classes", 100))
    smooth = int(cfg.options.get("smooth", 1))  # > 1: templates drawn at 1/smooth the size, upsampled
    generator = torch.Generator().manual_seed(cfg.seed)
    if smooth > 1:  # smooth, image-like templates: a shifted view still looks like its class
        small = torch.randn(
            num_classes, shape[0], shape[1] // smooth, shape[2] // smooth, generator=generator
        )
        templates = torch.nn.functional.interpolate(
            small, size=shape[1:], mode="bicubic", align_corners=False
        )
        templates = templates / templates.std()
    else:
        templates = torch.randn(num_classes, *shape, generator=generator)
    labels = torch.randint(0, num_classes, (cfg.num_samples,), generator=generator)
    noise = float(cfg.options.get("noise", 1.5))
    drawn = templates[labels]
    jitter = int(
        cfg.options.get("jitter", 0)
    )  # > 0: each image's template moved by up to this, maybe mirrored
    if jitter:  # as objects sit anywhere in photos: the invariance crop-flip augmentation teaches
        moves = torch.randint(-jitter, jitter + 1, (cfg.num_samples, 2), generator=generator)
        mirror = torch.rand(cfg.num_samples, generator=generator) < 0.5
        drawn = torch.stack(
            [
                torch.roll(t.flip(-1) if m else t, (int(dy), int(dx)), (1, 2))
                for t, (dy, dx), m in zip(drawn, moves, mirror, strict=True)
            ]
        )
    inputs = drawn + noise * torch.randn(cfg.num_samples, *shape, generator=generator)
    num_train = int(0.8 * cfg.num_samples)
    preprocessing = {
        "inputs": f"synthetic class templates + N(0, {noise:g}^2) noise, float32, shape {list(shape)}"
        + (f", templates upsampled {smooth}x" if smooth > 1 else "")
        + (f", moved by up to {jitter} px and mirrored at random" if jitter else ""),
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


def _npz(cfg: DatasetConfig) -> dict[str, Split]:
    """Anything else, as .npz files: dataset.options.train / .test name files holding `x` (N, ...) and `y`
    (N,), optionally `ids` (N,) stable sample ids (default: row numbers, test rows after train rows)."""
    arrays = {}
    for split in SPLITS:
        path = cfg.options.get(split)
        if not path:
            raise KDError(f"dataset 'npz' needs dataset.options.{split}: the path of a .npz with x and y")
        try:
            with np.load(path, allow_pickle=False) as f:  # data only: never unpickle
                arrays[split] = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise KDError(
                f"cannot read {path}: {err} (a relative path is read next to the preset file when it exists "
                "there, else from the working directory)"
            ) from None
        if "x" not in arrays[split] or "y" not in arrays[split]:
            raise KDError(f"{path} must hold arrays 'x' and 'y' (it has {', '.join(arrays[split])})")
    num_classes = int(cfg.options.get("num_classes", max(int(a["y"].max()) for a in arrays.values()) + 1))
    out, first_id = {}, 0
    for split, a in arrays.items():
        n = len(a["y"])
        ids = a.get("ids", np.arange(first_id, first_id + n))
        first_id += n
        out[split] = Split(
            dataset=str(cfg.options.get("name", "npz")),
            split=split,
            inputs=torch.from_numpy(np.asarray(a["x"], dtype=np.float32)),
            labels=torch.from_numpy(np.asarray(a["y"], dtype=np.int64)),
            ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
            num_classes=num_classes,
            preprocessing={"inputs": f"npz x as float32 ({Path(str(cfg.options[split])).name})"},
        )
    return out


def _image_folder(cfg: DatasetConfig) -> dict[str, Split]:
    """Image folders (a class per subfolder) under dataset.options.train / .test, read per sample by
    DataLoader workers (pipeline/data/readers.py): decoded uint8, the shorter side resized to
    options.resize (default options.size), center-cropped to options.size (default 32), scaled to [0, 1],
    normalized by options.mean / .std if given. Sample ids: positions in sorted relative-path order
    (test after train); the fingerprint covers ids, labels and every file's bytes."""
    recipe = _image_recipe(cfg.options)
    out, first_id, classes = {}, 0, None
    for split in SPLITS:
        root = cfg.options.get(split)
        if not root or not Path(str(root)).is_dir():
            raise KDError(
                f"dataset 'imagefolder' needs dataset.options.{split}: a folder with one subfolder per class"
            )
        found, paths, labels = list_images(Path(str(root)))
        if classes is not None and found != classes:
            raise KDError(f"{root}: its classes {found} differ from the train split's {classes}")
        if not paths:
            raise KDError(
                f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders"
            )
        classes = found
        reader = ImageFiles(Path(str(root)), paths, workers=cfg.workers, **recipe)
        out[split] = Split(
            dataset=str(cfg.options.get("name", "imagefolder")),
            split=split,
            inputs=reader,
            labels=torch.tensor(labels, dtype=torch.int64),
            ids=torch.arange(first_id, first_id + len(paths)),
            num_classes=len(classes),
            preprocessing={
                **_image_preprocessing(recipe),
                "classes": classes,
                "ids": "positions in sorted relative-path order, test after train",
                "fingerprint": "ids, labels, every file's relative path and bytes",
            },
            content=reader.content(),
        )
        first_id += len(paths)
    return out


def _image_recipe(options: Any) -> dict[str, Any]:
    """The fixed view of an image source's options: crop `size`, shorter side `resize`, `mean`, `std`."""
    size = int(options.get("size", 32))
    resize = int(options.get("resize", size))
    if size < 1 or resize < size:
        raise KDError(f"dataset.options: size ({size}) must be >= 1 and resize ({resize}) >= size")
    mean, std = options.get("mean"), options.get("std")
    if (mean is None) != (std is None):
        raise KDError("dataset.options: give both mean and std (3 numbers each), or neither")
    return {"size": size, "resize": resize, "mean": mean, "std": std}


def _image_preprocessing(recipe: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of an image recipe (part of the cache's key)."""
    return {
        "decode": "RGB uint8 (Pillow)",
        "resize": recipe["resize"],
        "center_crop": recipe["size"],
        "to_tensor": "[0, 1]",
        "mean": recipe["mean"],
        "std": recipe["std"],
    }


def _npy(cfg: DatasetConfig) -> dict[str, Split]:
    """.npy arrays opened as memmaps: dataset.options.train / .test name folders holding x.npy (N, ...)
    and y.npy (N,), optionally ids.npy (N,) (default: row numbers, test rows after train rows). The rows of
    x are read where they lie, as batches ask; the fingerprint streams x's bytes once per file version."""
    out: dict[str, Split] = {}
    first_id, parts = 0, {}
    for split in SPLITS:
        folder = Path(str(cfg.options.get(split, "")))
        if not cfg.options.get(split):
            raise KDError(f"dataset 'npy' needs dataset.options.{split}: a folder holding x.npy and y.npy")
        missing = [f for f in ("x.npy", "y.npy") if not (folder / f).is_file()]
        if missing:
            what = "does not exist" if not folder.is_dir() else f"has no {' and no '.join(missing)}"
            raise KDError(
                f"dataset.options.{split} = {folder} {what}: it must be a folder holding x.npy (N, ...) and "
                "y.npy (N,)"
            )
        reader = NpyRows(folder / "x.npy", workers=cfg.workers)
        labels = np.asarray(open_npy(folder / "y.npy"))
        ids = np.asarray(open_npy(folder / "ids.npy")) if (folder / "ids.npy").is_file() else None
        if labels.shape != (len(reader),) or (ids is not None and ids.shape != (len(reader),)):
            raise KDError(
                f"{folder}: y.npy (and ids.npy) must hold one value per row of x.npy ({len(reader)} rows), "
                f"got {labels.shape}"
            )
        # the content: x's bytes (streamed once, kept) and the labels
        labels_digest = hashlib.sha256(np.ascontiguousarray(labels.astype(np.int64)).tobytes()).hexdigest()
        parts[split] = (reader, labels, ids, f"{reader.content()}:{labels_digest}")
    num_classes = int(cfg.options.get("num_classes", max(int(p[1].max()) for p in parts.values()) + 1))
    for split, (reader, labels, ids, content) in parts.items():
        n = len(reader)
        out[split] = Split(
            dataset=str(cfg.options.get("name", "npy")),
            split=split,
            inputs=reader,
            labels=torch.from_numpy(labels.astype(np.int64)),
            ids=torch.from_numpy(np.arange(first_id, first_id + n) if ids is None else ids.astype(np.int64)),
            num_classes=num_classes,
            preprocessing={
                "inputs": f"npy memmap x as float32 ({reader.path.parent.name}/x.npy)",
                "fingerprint": "ids, labels, x's dtype, shape and bytes",
            },
            content=content,
        )
        first_id += n
    return out


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(cfg: DatasetConfig) -> dict[str, Split]:
    """CIFAR-10 / -100 from torchvision under dataset.options.root (default data/datasets); downloaded only
    with options.download = true. Normalized by the usual channel mean / std; ids = row numbers."""
    from torchvision import datasets

    root = str(cfg.options.get("root", "data/datasets"))
    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[cfg.name])
    out, first_id = {}, 0
    for split in SPLITS:
        try:
            data = cls(root, train=split == "train", download=bool(cfg.options.get("download", False)))
        except RuntimeError as err:
            raise KDError(
                f"{cfg.name} is not under {root} ({err}): pass --set dataset.options.download=true on a "
                "machine with network, or copy the dataset folder there"
            ) from None
        inputs = (torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 255 - mean) / std
        out[split] = Split(
            dataset=cfg.name,
            split=split,
            inputs=inputs.contiguous(),
            labels=torch.tensor(data.targets),
            ids=torch.arange(first_id, first_id + len(data.targets)),
            num_classes=len(data.classes),
            preprocessing={
                "inputs": "uint8 / 255, normalized by channel",
                "mean": CIFAR_STATS[cfg.name][0],
                "std": CIFAR_STATS[cfg.name][1],
                "augmentation": "none in the cache: the teacher saw the fixed view",
            },
        )
        first_id += len(data.targets)
    return out


def _hf_text(cfg: DatasetConfig) -> dict[str, Split]:
    """Text classification through Hugging Face `datasets` (pipeline/data/arrow.py), tokenized with the
    model's tokenizer as batches ask.

    options: `hub` (+ `config`, e.g. "glue" / "sst2") or `format` ("csv", "json", "parquet") with `train` /
    `test` files, or `disk` (+ `train` / `test` folders written by save_to_disk); `text` (a column, or two
    for sentence pairs), `label` (default "label"), `test_split` (default "test"; GLUE: "validation"),
    `tokenizer` (hub id or local path) and `max_length` (default 128). Inputs are (N, 2, L) int64:
    input_ids and attention_mask, padded to max_length; the manifest records tokenizer and max length."""
    from transformers import AutoTokenizer

    o = cfg.options
    tokenizer_name = o.get("tokenizer")
    if not tokenizer_name:
        raise KDError("dataset 'hf-text' needs dataset.options.tokenizer: the model's hub id or local folder")
    max_length = int(o.get("max_length", 128))
    text = o.get("text", "text")
    columns = [text] if isinstance(text, str) else list(text)
    label = str(o.get("label", "label"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name))
    except Exception as err:  # offline hub lookups, missing files
        raise KDError(
            f"cannot load the tokenizer ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ": offline, pass a local save_pretrained tokenizer folder"
        ) from None
    parts = load_parts(dict(o), "hf-text")
    labels_all = {split: column_values(parts[split], label) for split in SPLITS}
    for split in SPLITS:
        missing = [c for c in columns if c not in parts[split].column_names]
        if missing:
            raise KDError(
                f"the {split} data has no column {missing[0]!r} (it has {parts[split].column_names})"
            )
    num_classes = int(o.get("num_classes", max(int(v.max()) for v in labels_all.values() if len(v)) + 1))
    settings = {"tokenizer": tokenizer_digest(tokenizer), "max_length": max_length, "text": columns}
    out, first_id = {}, 0
    for split in SPLITS:
        rows, labels = parts[split], labels_all[split]
        reader = ArrowText(rows, columns, tokenizer, max_length)
        unknown = _unknown_fraction(reader[: min(len(reader), 1024)], tokenizer.unk_token_id)
        if unknown > 0.05:
            print(
                f"warning: {100 * unknown:.1f}% of the {split} tokens are unknown to tokenizer "
                f"'{tokenizer_name}' (more than 5%): is it the tokenizer the teacher was trained with?",
                file=sys.stderr,
            )
        n = len(rows)
        out[split] = Split(
            dataset=str(o.get("name", o.get("config") or o.get("hub") or "hf-text")),
            split=split,
            inputs=reader,
            labels=torch.from_numpy(labels.astype(np.int64)),
            ids=torch.arange(first_id, first_id + n),
            num_classes=num_classes,
            preprocessing={
                "tokenizer": str(tokenizer_name),
                "max_length": max_length,
                "text": columns,
                "padding": "max_length",
                "fingerprint": "ids, labels, the rows' datasets fingerprint, tokenizer and max length",
            },
            content=content_of(rows, labels, settings),
        )
        first_id += n
    return out


def _hf_images(cfg: DatasetConfig) -> dict[str, Split]:
    """Image classification through Hugging Face `datasets` (Arrow: parquet files, save_to_disk folders,
    a hub name): options `image` (the column, default "image"), `label` (default "label") and the
    sources of hf-text; each image decoded per sample by the workers with imagefolder's recipe (`size`,
    `resize`, `mean`, `std`; random-resized-crop views too). Sample ids: row numbers, test after train."""
    o = cfg.options
    recipe = _image_recipe(o)
    image, label = str(o.get("image", "image")), str(o.get("label", "label"))
    parts = load_parts(dict(o), "hf-images")
    labels_all = {split: column_values(parts[split], label) for split in SPLITS}
    num_classes = int(o.get("num_classes", max(int(v.max()) for v in labels_all.values() if len(v)) + 1))
    out, first_id = {}, 0
    for split in SPLITS:
        rows, labels = parts[split], labels_all[split]
        reader = ArrowImages(rows, image, workers=cfg.workers, **recipe)
        out[split] = Split(
            dataset=str(o.get("name", o.get("config") or o.get("hub") or "hf-images")),
            split=split,
            inputs=reader,
            labels=torch.from_numpy(labels.astype(np.int64)),
            ids=torch.arange(first_id, first_id + len(rows)),
            num_classes=num_classes,
            preprocessing={
                **_image_preprocessing(recipe),
                "image": image,
                "ids": "row numbers, test after train",
                "fingerprint": "ids, labels, the rows' datasets fingerprint and the recipe",
            },
            content=content_of(rows, labels, {**recipe, "image": image}),
        )
        first_id += len(rows)
    return out


def _unknown_fraction(inputs: torch.Tensor, unk_id: int | None) -> float:
    """The share of real (attended) tokens that are the tokenizer's unknown token. inputs (N, 2, L)."""
    if unk_id is None:
        return 0.0
    real = inputs[:, 1].bool()
    return float((inputs[:, 0][real] == unk_id).float().mean()) if real.any() else 0.0


# The options each builder reads (README "Your own data"): anything else is refused by name, never ignored.
HF_SOURCE = {"hub", "config", "format", "disk", "train", "test", "test_split", "label", "num_classes", "name"}
IMAGE_RECIPE = {"size", "resize", "mean", "std"}  # _image_recipe's
DATASET_OPTIONS: dict[str, set[str]] = {
    "mnist1d": set(),
    "synthetic-images": {"shape", "num_classes", "smooth", "noise", "jitter"},
    "npz": {"train", "test", "num_classes", "name"},
    "imagefolder": {"train", "test", "name"} | IMAGE_RECIPE,
    "npy": {"train", "test", "num_classes", "name"},
    "cifar10": {"root", "download"},
    "cifar100": {"root", "download"},
    "hf-text": HF_SOURCE | {"text", "tokenizer", "max_length"},
    "hf-images": HF_SOURCE | IMAGE_RECIPE | {"image"},
    "lm-text": set(OPTIONS),
}

DATASETS: dict[str, Callable[[DatasetConfig], dict[str, Split]]] = {
    "mnist1d": _mnist1d,
    "synthetic-images": _synthetic_images,
    "npz": _npz,
    "imagefolder": _image_folder,
    "npy": _npy,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "hf-text": _hf_text,
    "hf-images": _hf_images,
    "lm-text": lm_text,  # language modelling: token sequences (pipeline/data/lm_data.py)
}


def tokenizer_of(cfg: DatasetConfig) -> Any:
    """The tokenizer a language-modelling dataset was tokenized with (built with the dataset)."""
    load_split(cfg, "train")
    return _built[json.dumps(dataclasses.asdict(cfg), sort_keys=True)]["tokenizer"]
