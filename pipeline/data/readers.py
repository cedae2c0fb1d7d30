"""Inputs read sample by sample from files, by DataLoader workers: the sources bigger than memory.

A `SampleReader` is a map-style dataset of one split's inputs (position -> float32 sample, decoded on
demand). A `Split` holds one in place of its inputs tensor when the source does not fit
`dataset.memory_budget_mb` (a smaller one is read whole through the same workers, once); labels and
sample ids always sit in memory (8 bytes a row each: ImageNet-1k's 1.28 million rows are 20 MB).

    reader[rows]                         # (B, ...) float32: the rows asked for, through the workers
    for rows, x in prefetched(reader, ...)   # batches in order, decoded ahead by the workers

Kinds:
    ImageFiles  image files (a class per subfolder), decoded with Pillow (libjpeg-turbo), kept uint8
                until the last step: resize (shorter side), center crop, scale to [0, 1], normalize: the
                fixed view torchvision's pretrained weights define. Sample ids are the
                positions of the files in sorted relative-path order (dataset README).
    NpyRows     a .npy array opened as a memmap: rows read where they lie.

Each reader's `content` digest covers every input byte (file bytes, not decoded pixels), streamed once
per version of its files and kept (pipeline/data/kept.py) under a digest of the file list with sizes and
modification times: a cache hit reads no image a second time. A file that cannot be read or decoded is
a one-line KDError naming it, raised in the main process (never a worker's traceback).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.data.kept import keep, path_for
from pipeline.errors import KDError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
HASH_BLOCK = 1 << 20  # bytes read at a time while hashing

T = TypeVar("T")


def default_workers() -> int:
    """DataLoader workers when `dataset.workers` is -1: one core stays with the main process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class Unreadable:
    """What a worker returns for a sample it could not read: the main process raises it in one line."""

    path: str
    reason: str


class SampleReader:
    """A split's inputs, read one sample at a time (`sample(i)`), indexable like the tensor it stands for:
    `reader[rows]` gives those rows (B, ...) float32, `reader.shape`, `reader.dim()`, `len(reader)`."""

    kind = "reader"
    dtype = torch.float32
    direct = False  # True: rows are read in this process where they lie (a memmap), not by workers
    cuts_views = False  # True: answers ("view", box) and ("draw", ...) asks (random-resized-crop)

    def __init__(self, num_rows: int, sample_shape: tuple[int, ...], workers: int = -1) -> None:
        self.num_rows, self.sample_shape = num_rows, tuple(sample_shape)
        self.workers = default_workers() if workers < 0 else workers

    # -- what a kind implements ---------------------------------------------------------------------
    def sample(self, i: int) -> torch.Tensor:
        """The input at position i, float32 of `sample_shape`."""
        raise NotImplementedError

    def name_of(self, i: int) -> str:
        """The file (or file and row) position i is read from, for errors."""
        raise NotImplementedError

    def listing(self) -> Any:
        """Everything the content digest depends on that is cheap to read (paths, sizes, mtimes)."""
        raise NotImplementedError

    def stream_content(self) -> Iterator[tuple[int, bytes]]:
        """(rows finished, bytes): every input byte, in position order (hashed once per version)."""
        raise NotImplementedError

    def answer(self, i: int, ask: tuple) -> Any:
        """Something other than the sample at position i, asked by a plan (`Asks`): views, for readers
        that cut them."""
        raise NotImplementedError(f"{type(self).__name__} answers no {ask[0]!r}")

    # -- a tensor's face ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, *self.sample_shape))

    def dim(self) -> int:
        return 1 + len(self.sample_shape)

    @property
    def ndim(self) -> int:
        return self.dim()

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split as a tensor in memory."""
        return self.num_rows * math.prod(self.sample_shape) * self.dtype.itemsize

    def __getitem__(self, rows: Any) -> torch.Tensor:
        """reader[i] -> sample i; reader[slice | tensor | list] -> the rows (B, ...), read through the
        workers (as a tensor of the inputs would give them)."""
        if isinstance(rows, (int, np.integer)):
            return self.sample(int(rows) % max(self.num_rows, 1))
        return read_rows(self, row_positions(rows, self.num_rows))

    def item(self, i: int, ask: tuple | None = None) -> tuple[int, Any]:
        """What a DataLoader worker returns for position i: (i, the sample, or `answer(i, ask)`), or
        (i, Unreadable) when it cannot be read (raised in one line by the main process)."""
        try:
            return i, self.sample(i) if ask is None else self.answer(i, ask)
        except Exception as err:  # any decoder's error: reported by the main process, in one line
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:200]
            return i, Unreadable(self.name_of(i), reason)

    def __reduce__(self) -> Any:  # workers under spawn get a copy without open files (memmaps)
        return (_rebuild, (type(self), self._state()))

    def _state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # no open files

    # -- the content digest -------------------------------------------------------------------------
    def content(self, progress: bool = True) -> str:
        """sha256 of every input byte, streamed once per version of the files and kept."""
        listing = hashlib.sha256(json.dumps(self.listing(), sort_keys=True).encode()).hexdigest()
        kept = path_for(f"content-{self.kind}", {"listing": listing}, ".json")
        try:
            return str(json.loads(kept.read_text())["content"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        digest = hashlib.sha256()
        from pipeline.training.progress import Progress

        desc = f"fingerprint {self.kind}"
        bar = Progress(total=self.num_rows, desc=desc, unit="sample", every_s=10.0, enabled=progress)
        try:
            for done, block in self.stream_content():
                digest.update(block)
                if done:
                    bar.update(done)
        finally:
            bar.close()
        value = digest.hexdigest()
        keep(kept, lambda tmp: tmp.write_text(json.dumps({"content": value, "rows": self.num_rows})))
        return value

    def load(self) -> torch.Tensor:
        """Every row, read through the workers into one tensor (a source that fits its memory budget)."""
        return read_rows(self, torch.arange(self.num_rows))


class RowsOf(SampleReader):
    """Some rows of a reader (a validation carve), read as batches ask like the reader's own."""

    def __init__(self, base: SampleReader, rows: torch.Tensor) -> None:
        super().__init__(len(rows), base.sample_shape, base.workers)
        self.base, self.rows = base, torch.as_tensor(rows).to("cpu", torch.int64)
        self.kind, self.dtype, self.direct = base.kind, base.dtype, base.direct
        self.cuts_views = base.cuts_views

    def sample(self, i: int) -> torch.Tensor:
        return self.base.sample(int(self.rows[i]))

    def item(self, i: int, ask: tuple | None = None) -> tuple[int, Any]:
        return i, self.base.item(int(self.rows[i]), ask)[1]

    def name_of(self, i: int) -> str:
        return self.base.name_of(int(self.rows[i]))

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if self.direct:  # the base reads rows where they lie
            return self.base[self.rows[row_positions(rows, self.num_rows)]]
        return super().__getitem__(rows)


def rows_of(inputs: Any, rows: torch.Tensor) -> Any:
    """inputs[rows]: a tensor's rows, or, of a reader, a reader of those rows (read as batches ask, never
    held whole: a validation carve of a big split stays on disk)."""
    return RowsOf(inputs, rows) if isinstance(inputs, SampleReader) else inputs[rows]


def _rebuild(cls: type, state: dict[str, Any]) -> SampleReader:
    reader = cls.__new__(cls)
    reader.__dict__.update(state)
    return reader


def row_positions(rows: Any, n: int) -> torch.Tensor:
    """Positions 0..n-1 (int64) of an index: a slice, a tensor, a list or an int; negatives wrap."""
    if isinstance(rows, slice):
        return torch.arange(n)[rows]
    positions = torch.as_tensor(rows).to("cpu", torch.int64).reshape(-1)
    if len(positions) and (int(positions.min()) < -n or int(positions.max()) >= n):
        raise IndexError(f"rows out of range for {n} samples")
    return positions % max(n, 1)


@dataclass(frozen=True)
class Asks:
    """A plan's rows with a question for each (as `SampleReader.answer` takes it), instead of plain
    positions: ("view", (top, left, h, w, flip)) replays a stored view, ("draw", seed, K, sample id)
    draws K views and returns (views (K, ...), their parameters (K, P))."""

    positions: torch.Tensor
    asks: list[tuple]

    @staticmethod
    def draws(positions: torch.Tensor, ids: torch.Tensor, seed: int, count: int) -> Asks:
        """The rows at `positions` (sample ids `ids`) asked for `count` views drawn from (seed, id)."""
        return Asks(positions, [("draw", seed, count, int(i)) for i in ids.tolist()])


class _Items(torch.utils.data.Dataset):
    """A reader as DataLoader workers see it: position -> (position, sample or Unreadable)."""

    def __init__(self, reader: SampleReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, request: int | tuple) -> tuple[int, Any]:
        if isinstance(request, tuple):
            return self.reader.item(*request)
        return self.reader.item(request)


def _collate(items: Sequence[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
    """A batch of (position, sample): the stacked samples (a tuple of them stacked element by element),
    or the first sample that could not be read."""
    positions = torch.tensor([i for i, _ in items])
    for _, x in items:
        if isinstance(x, Unreadable):
            return positions, x
    if isinstance(items[0][1], tuple):
        return positions, tuple(torch.stack(part) for part in zip(*(x for _, x in items), strict=True))
    return positions, torch.stack([x for _, x in items])


def _requests(rows: Any, num_rows: int) -> list:
    """A batch sampler's list: positions, or (position, ask) pairs for Asks."""
    if isinstance(rows, Asks):
        return list(zip(row_positions(rows.positions, num_rows).tolist(), rows.asks, strict=True))
    return row_positions(rows, num_rows).tolist()


def unreadable_error(bad: Unreadable) -> KDError:
    return KDError(
        f"cannot read input {bad.path} ({bad.reason}): replace the file with a sound copy, then run again"
    )


class _Plan:
    """A DataLoader's batch sampler over a stream of (rows, extra): the rows go to the workers, the
    extras wait in order for their batches (the loader keeps batch order)."""

    def __init__(self, plans: Iterable[tuple[Any, Any]], pending: deque, num_rows: int) -> None:
        self.plans, self.pending, self.num_rows = plans, pending, num_rows

    def __iter__(self) -> Iterator[list[int]]:
        for rows, extra in self.plans:
            self.pending.append((rows, extra))
            yield _requests(rows, self.num_rows)


def prefetched(
    reader: SampleReader,
    plans: Iterable[tuple[Any, T]],
    *,
    pin: bool = False,
    workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, T]]:
    """(rows, inputs (B, ...), extra) for each (rows, extra) of `plans` (rows: positions, a tensor or a
    slice), in order, the inputs decoded ahead by `reader.workers` DataLoader workers (pinned for a CUDA
    copy when `pin`)."""
    workers = reader.workers if workers is None else workers
    if reader.direct:
        for rows, extra in plans:
            yield rows, reader[row_positions(rows, reader.num_rows)], extra
        return
    if workers == 0:
        items = _Items(reader)
        for rows, extra in plans:
            _, x = _collate([items[request] for request in _requests(rows, reader.num_rows)])
            if isinstance(x, Unreadable):
                raise unreadable_error(x)
            yield rows, x, extra
        return
    pending: deque = deque()
    loader = torch.utils.data.DataLoader(
        _Items(reader),
        batch_sampler=_Plan(plans, pending, reader.num_rows),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=4,
        # the workers' base seed from a generator of their own, not the global one: reading the data
        # must not move the RNG that initializes models (the workers draw nothing at random)
        generator=torch.Generator().manual_seed(0),
    )
    for _, x in loader:
        rows, extra = pending.popleft()
        if isinstance(x, Unreadable):
            raise unreadable_error(x)
        yield rows, x, extra


def read_rows(reader: SampleReader, positions: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The rows at `positions`, in that order (B, ...)."""
    if reader.direct:
        return reader[positions]
    out = torch.empty((len(positions), *reader.sample_shape), dtype=reader.dtype)
    if len(positions) == 0:
        return out
    # few rows: read here (starting workers costs more than a handful of decodes)
    workers = 0 if len(positions) <= 2 * batch_size else None
    n = len(positions)
    plan = (
        (positions[a : a + batch_size], torch.arange(a, min(a + batch_size, n)))
        for a in range(0, n, batch_size)
    )
    for _, x, at in prefetched(reader, plan, workers=workers):
        out[at] = x
    return out


def iter_rows(
    inputs: torch.Tensor | SampleReader, batch_size: int, *, pin: bool = False
) -> Iterator[torch.Tensor]:
    """Consecutive batches of rows 0..N-1 of a tensor or a reader (decoded ahead by its workers)."""
    plan = ((slice(a, a + batch_size), None) for a in range(0, len(inputs), batch_size))
    for x, _ in fetch(inputs, plan, pin=pin):
        yield x


def fetch(
    inputs: Any,
    plans: Iterable[tuple[Any, T]],
    *,
    pin: bool = False,
) -> Iterator[tuple[torch.Tensor, T]]:
    """(inputs[rows], extra) for each (rows, extra) of `plans` (rows: a slice or positions), in order: a
    tensor is indexed, a reader read ahead by its workers (pinned for a CUDA copy when `pin`); rows given
    as `Asks` get the reader's answers."""
    if isinstance(inputs, SampleReader):
        for _, x, extra in prefetched(inputs, plans, pin=pin):
            yield x, extra
        return
    for rows, extra in plans:
        yield inputs[rows], extra


# -- image files -------------------------------------------------------------------------------------
def list_images(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, relative paths, labels) of an image folder: a class per subfolder (sorted), the files in
    sorted relative-path order (their positions are the sample ids)."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise KDError(f"{root} has no class subfolders: an image folder holds one subfolder per class")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, root)
            found += [
                f"{rel}/{f}".replace(os.sep, "/")
                for f in files
                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
            ]
        paths += sorted(found)
        labels += [label] * len(found)
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return classes, [paths[i] for i in order], [labels[i] for i in order]


class ImageReader(SampleReader):
    """Images decoded per sample: uint8 (C, H, W) -> shorter side resized to `resize` -> center crop
    `size` x `size` -> float [0, 1] -> normalized by mean / std when given; random-resized-crop views cut
    from the decoded image. A kind says where an image's bytes are (`decoded`)."""

    cuts_views = True

    def __init__(
        self,
        num_rows: int,
        *,
        size: int,
        resize: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        workers: int = -1,
    ) -> None:
        super().__init__(num_rows, (3, size, size), workers)
        # imported here, once: forked workers inherit them instead of each paying ~1 s of imports
        import PIL.Image  # noqa: F401
        import torchvision.transforms.v2.functional  # noqa: F401

        self.size, self.resize = size, resize or size
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]

    def decoded(self, i: int) -> torch.Tensor:
        """The image at position i as uint8 (3, H, W), as stored (no resize)."""
        raise NotImplementedError

    def finish(self, image: torch.Tensor, resize: int | None = None) -> torch.Tensor:
        """uint8 (3, H, W) -> the fixed view: resize the shorter side, center crop, [0, 1], normalize."""
        from torchvision.transforms.v2 import functional as F

        image = F.resize(image, [resize or self.resize], antialias=True)
        image = F.center_crop(image, [self.size, self.size])
        return self.scale(image)

    def scale(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) / 255
        if self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)
        return x

    def sample(self, i: int) -> torch.Tensor:
        return self.finish(self.decoded(i))

    def view(self, image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
        """A random-resized-crop view of a decoded image: the box (top, left, height, width, flip) cut,
        resized to size x size, mirrored when flip, scaled and normalized (pipeline.data.augment)."""
        from pipeline.data.augment import cut_view

        return self.scale(cut_view(image, box, self.size))

    def answer(self, i: int, ask: tuple) -> Any:
        if ask[0] == "view":  # replay a stored view
            return self.view(self.decoded(i), ask[1])
        if ask[0] == "draw":  # draw K views: their boxes need the image's size
            from pipeline.data.augment import crop_box

            _, seed, count, sample_id = ask
            image = self.decoded(i)
            boxes = [crop_box(seed, sample_id, k, image.shape[1], image.shape[2]) for k in range(count)]
            views = torch.stack([self.view(image, box) for box in boxes])  # (K, 3, size, size)
            return views, torch.tensor(boxes, dtype=torch.int16)  # (K, 5)
        return super().answer(i, ask)


class ImageFiles(ImageReader):
    """Image files (a class per subfolder), decoded with Pillow."""

    kind = "imagefolder"

    def __init__(self, root: Path, paths: list[str], **settings: Any) -> None:
        super().__init__(len(paths), **settings)
        self.root, self.paths = Path(root), paths

    def name_of(self, i: int) -> str:
        return str(self.root / self.paths[i])

    def decoded(self, i: int) -> torch.Tensor:
        return decode_image(self.root / self.paths[i])

    def listing(self) -> Any:
        stats = []
        for rel in self.paths:
            st = os.stat(self.root / rel)
            stats.append((rel, st.st_size, st.st_mtime_ns))
        return {"root": str(self.root.resolve()), "files": stats}

    def stream_content(self) -> Iterator[tuple[int, bytes]]:
        for rel in self.paths:  # each file's path and byte count delimit it from the next
            try:
                yield 0, f"{rel}\0{os.path.getsize(self.root / rel)}\0".encode()
                with open(self.root / rel, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        yield 0, block
                yield 1, b""
            except OSError as err:
                raise KDError(
                    f"cannot read input {self.root / rel} ({err.strerror}): replace or remove the file"
                ) from None


def decode_image(source: Any) -> torch.Tensor:
    """An image file (a path or a binary file object) as uint8 (3, H, W) RGB, decoded with Pillow."""
    from PIL import Image

    with Image.open(source) as image:
        array = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# -- .npy arrays -------------------------------------------------------------------------------------
class NpyRows(SampleReader):
    """Rows of a .npy array opened as a memmap (any numeric dtype, read as float32)."""

    kind = "npy"

    def __init__(self, path: Path, workers: int = -1) -> None:
        array = open_npy(path)
        super().__init__(int(array.shape[0]), tuple(int(s) for s in array.shape[1:]), workers)
        self.path = Path(path)

    @property
    def array(self) -> np.ndarray:
        if getattr(self, "_array", None) is None:  # opened again in each worker
            self._array = open_npy(self.path)
        return self._array

    def name_of(self, i: int) -> str:
        return f"{self.path} (row {i})"

    def sample(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i], dtype=np.float32))

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, (int, np.integer)):
            return super().__getitem__(rows)
        positions = row_positions(rows, self.num_rows).numpy()  # a memmap reads rows where they lie
        return torch.from_numpy(np.asarray(self.array[positions], dtype=np.float32))

    def listing(self) -> Any:
        st = os.stat(self.path)
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}

    def stream_content(self) -> Iterator[tuple[int, bytes]]:
        array = self.array
        yield 0, f"{array.dtype.str}{array.shape}".encode()
        rows = max(1, HASH_BLOCK // max(1, array[:1].nbytes))
        for a in range(0, len(array), rows):
            block = np.ascontiguousarray(array[a : a + rows])
            yield len(block), block.tobytes()


def open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KDError(f"cannot open {path} as a .npy array: {err}") from None
    if not isinstance(array, np.ndarray) or array.ndim < 1 or array.dtype.kind not in "biuf":
        what = getattr(array, "dtype", type(array).__name__)
        raise KDError(f"{path} must hold one numeric array (N, ...); it holds {what}")
    return array
