"""Input augmentation as parameters: drawn, stored and replayed exactly.

Every augmentation here has a finite parameter space (a view is one point of it), so that

- stage 1 can store K views per sample (`cache.views`, `cache.augment`): the parameters of view k of
  sample i are a pure function of (view seed, sample id, k), so any writer, rank or resumed run makes the
  same views, and the teacher's logits of each view are stored beside them;
- stage 2 replays a stored view on the student's batch (on its device), so input and target agree;
- fresh augmentation (`train.augment` without a view cache) draws uniformly from the same space, so a
  cache of every view (`views = "all"`) gives exactly the distribution online augmentation gives.

Kinds (`pad` is the padding of crop-flip and the largest offset of the shifts):
    crop-flip   images (C, H, W): zero-pad by `pad`, crop back to H x W at (dy, dx), optional h-flip;
                (2 pad + 1)^2 * 2 views (162 at pad 4, CIFAR's recipe). Parameters (dy, dx, flip).
    shift       1-D signals (L,) or (C, L): circular shift by `offset` in [-pad, pad]; 2 pad + 1 views.
    shift-zero  the same shift, zero-filled instead of wrapped around. Parameters (offset,).

One augmentation has a continuous space, the ImageNet recipe (FKD's, torchvision's RandomResizedCrop):

    random-resized-crop  image files (an imagefolder source): a box of the decoded image, its area a
                fraction in `RRC_SCALE` of the image's and its aspect ratio in `RRC_RATIO` (log-uniform),
                resized to the split's size, and a coin-flip mirror. Parameters (top, left, height,
                width, flip) in pixels of the decoded image: drawn in the DataLoader workers (the box
                needs the image's size) from (view seed, sample id, view index) by `crop_box`, stored,
                and replayed on the decoded image in the workers (pipeline.data.readers.ImageFiles). K
                views are drawn; `views = "all"` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import KDError

if TYPE_CHECKING:  # numpy and torch are imported where used: the settings (pipeline.config) load fast
    import numpy as np
    import torch

AUGMENTS = ("none", "crop-flip", "shift", "shift-zero", "random-resized-crop")
AUGMENT_VERSION = 1  # of the parameter layout and replay below; a cache from another version is refused
PARAM_NAMES = {
    "crop-flip": ("dy", "dx", "flip"),
    "shift": ("offset",),
    "shift-zero": ("offset",),
    "random-resized-crop": ("top", "left", "height", "width", "flip"),
}
RRC = "random-resized-crop"
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults, the ImageNet recipe
RRC_RATIO = (3 / 4, 4 / 3)
CONTINUOUS = 2**31 - 1  # the `space` of an augmentation whose views cannot be enumerated


@dataclass(frozen=True)
class AugmentSpec:
    kind: str = "none"
    pad: int = 4

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTS:
            raise KDError(f"unknown augment '{self.kind}': use {', '.join(AUGMENTS)}")
        if self.pad < 0:
            raise KDError(f"augment_pad must be >= 0, got {self.pad}")

    @property
    def num_params(self) -> int:
        return len(PARAM_NAMES.get(self.kind, ()))

    @property
    def space(self) -> int:
        """How many distinct views the augmentation has (CONTINUOUS: too many to enumerate)."""
        side = 2 * self.pad + 1
        return {"none": 1, "crop-flip": side * side * 2, RRC: CONTINUOUS}.get(self.kind, side)

    @property
    def on_files(self) -> bool:
        """Whether views are cut from the decoded files in the workers (not from the fixed view)."""
        return self.kind == RRC

    def enumerate(self) -> np.ndarray:
        """Every view's parameters (space, P) int16, in a fixed order (view k of `views = "all"`)."""
        import numpy as np

        k = np.arange(self.space)
        side = 2 * self.pad + 1
        if self.kind == "crop-flip":
            return np.stack([k // (2 * side), (k // 2) % side, k % 2], 1).astype(np.int16)
        if self.kind in ("shift", "shift-zero"):
            return (k - self.pad)[:, None].astype(np.int16)
        if self.on_files:
            raise KDError(f"augment '{self.kind}' has a continuous space of views: they cannot be enumerated")
        return np.zeros((1, 0), dtype=np.int16)

    @property
    def pad_text(self) -> str:
        """ " (pad N)" for messages, where the augmentation has a padding ("" for random-resized-crop)."""
        return "" if self.on_files else f" (pad {self.pad})"

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.kind, "pad": self.pad, "params": list(PARAM_NAMES.get(self.kind, ()))}
        if self.on_files:
            described.update(scale=list(RRC_SCALE), ratio=list(RRC_RATIO))
        return described


def views_record(spec: AugmentSpec, count: int | str, seed: int) -> dict[str, Any]:
    """The manifest's `views` entry (part of the cache key); {} for the fixed view (the dense layout)."""
    if spec.kind == "none":
        return {}
    return {
        "count": spec.space if count == "all" else int(count),
        "all": count == "all",
        "seed": seed,
        "augment": spec.describe(),
        "version": AUGMENT_VERSION,
    }


def check_augment(kind: str, inputs: Any) -> None:
    """Refuse, before any training, an augmentation that does not fit the data. `inputs`: a split's
    `view_source` (its image files, for random-resized-crop)."""
    if kind == RRC and not getattr(inputs, "cuts_views", False):  # image files (readers.ImageFiles)
        raise KDError(
            f"augment '{kind}' cuts its views from the decoded images: it needs an imagefolder or "
            'hf-images source (use "crop-flip" for images held as arrays)'
        )
    if kind == "crop-flip" and inputs.dim() != 4:
        raise KDError(
            f"augment '{kind}' needs images (C, H, W), got inputs of shape {tuple(inputs.shape[1:])}: "
            'use augment = "shift" for 1-D signals, or "none"'
        )
    if kind in ("shift", "shift-zero") and inputs.dim() not in (2, 3):
        raise KDError(
            f"augment '{kind}' needs 1-D signals (L,) or (C, L), got inputs of shape "
            f'{tuple(inputs.shape[1:])}: use augment = "crop-flip" for images, or "none"'
        )


# -- drawing views deterministically ---------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays: a well-spread hash, the same on every machine."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def view_params(spec: AugmentSpec, ids: np.ndarray, count: int | str, seed: int) -> np.ndarray:
    """The parameters (B, K, P) int16 of the K views of each sample id: `count = "all"` gives every view
    in enumeration order; K <= space distinct views otherwise, chosen by hashing (seed, id, view), so the
    result depends on nothing else (not the batch, the rank or the order of writing)."""
    import numpy as np

    if spec.on_files or (count == "all" and spec.space == CONTINUOUS):
        raise KDError(f"view_params cannot draw '{spec.kind}' views: they are drawn from the image files")
    table = spec.enumerate()  # (space, P)
    ids = np.asarray(ids, dtype=np.int64)
    if count == "all":
        return np.broadcast_to(table, (len(ids), *table.shape)).copy()
    assert isinstance(count, int)
    if count > spec.space:
        raise KDError(
            f"cache.views = {count} but augment '{spec.kind}' (pad {spec.pad}) has only {spec.space} "
            f'distinct views: use views = "all" (= {spec.space}) or fewer'
        )
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + ids.astype(np.uint64))  # (B,)
        scores = _mix(key[:, None] ^ (np.arange(spec.space, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
    chosen = np.argsort(scores, axis=1, kind="stable")[:, :count]  # (B, K) distinct views per sample
    return table[chosen]


def _uniforms(seed: int, sample_id: int, view: int, count: int) -> np.ndarray:
    """`count` uniform numbers in [0, 1), a pure function of (seed, sample id, view): splitmix64."""
    import numpy as np

    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(sample_id & (2**64 - 1)))
        key = _mix(key ^ (np.uint64(view + 1) * np.uint64(0xD6E8FEB86659FD93)))
        draws = _mix(key + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return (draws >> np.uint64(11)).astype(np.float64) / float(2**53)


def crop_box(seed: int, sample_id: int, view: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, flip) of view `view` of a (height x width) image: torchvision's
    RandomResizedCrop.get_params (10 tries of an area fraction in RRC_SCALE and a log-uniform ratio in
    RRC_RATIO, else the largest centered box of a ratio within RRC_RATIO), drawn from (seed, sample id,
    view) alone, so every worker, rank and resumed run cuts the same box."""
    import math

    u = _uniforms(seed, sample_id, view, 41)
    area = height * width
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    flip = int(u[40] < 0.5)
    for t in range(10):
        a, r, y, x = u[4 * t : 4 * t + 4]
        target = area * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * a)
        ratio = math.exp(log_lo + (log_hi - log_lo) * r)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(y * (height - h + 1)), int(x * (width - w + 1)), h, w, flip
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def random_params(spec: AugmentSpec, batch: int, device: torch.device) -> torch.Tensor:
    """(B, P) parameters drawn uniformly over the views (the torch RNG): fresh augmentation."""
    import torch

    table = torch.from_numpy(spec.enumerate()).to(device)
    return table[torch.randint(0, spec.space, (batch,), device=device)]


# -- replaying a view ------------------------------------------------------------------------------
def replay(inputs: torch.Tensor, params: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """The views (B, ...) of a batch given their parameters (B, P), on the inputs' device."""
    import torch

    if spec.kind == "none":
        return inputs
    if spec.on_files:
        raise KDError(
            f"'{spec.kind}' views are cut from the decoded images, not from the fixed view: cut each with "
            "pipeline.cut_view(image, box, size) on the image as decoded (uint8 (3, H, W))"
        )
    params = params.to(inputs.device, torch.int64)
    if spec.kind == "crop-flip":
        return _crop_flip(inputs, params[:, 0], params[:, 1], params[:, 2].bool(), spec.pad)
    return _shift(inputs, params[:, 0], circular=spec.kind == "shift")


def _crop_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (torch.arange(h, device=images.device) + dy[:, None])[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w, device=images.device) + dx[:, None])[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped).contiguous()


def _shift(signals: torch.Tensor, offset: torch.Tensor, *, circular: bool) -> torch.Tensor:
    """out[..., t] = x[..., t - offset] (wrapped around, or 0 outside the signal)."""
    import torch

    length = signals.shape[-1]
    source = torch.arange(length, device=signals.device)[None, :] - offset[:, None]  # (B, L)
    shape = (len(signals),) + (1,) * (signals.dim() - 2) + (length,)
    if circular:
        return torch.gather(signals, -1, (source % length).view(shape).expand_as(signals))
    inside = (source >= 0) & (source < length)
    picked = torch.gather(signals, -1, source.clamp(0, length - 1).view(shape).expand_as(signals))
    return picked * inside.view(shape).to(signals.dtype)


def cut_view(image: torch.Tensor, box: Any, size: int) -> torch.Tensor:
    """A random-resized-crop view of a decoded image (3, H, W) uint8: the box (top, left, height, width,
    flip) a view cache stores for it, cut, resized to size x size (antialiased) and mirrored when flip;
    uint8, before any scaling or normalization. What kd's workers do, for your own loop."""
    from torchvision.transforms.v2 import functional as F

    top, left, height, width, flip = (int(v) for v in box)
    image = F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    return F.horizontal_flip(image) if flip else image


def crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The CIFAR recipe on a batch (B, C, H, W), freshly drawn: pad, random crop, random h-flip."""
    spec = AugmentSpec("crop-flip", padding)
    return replay(images, random_params(spec, len(images), images.device), spec)


def augment(inputs: torch.Tensor, kind: str, pad: int = 4) -> torch.Tensor:
    """Fresh augmentation of a batch: a view drawn uniformly for each sample."""
    if kind == "none":
        return inputs
    check_augment(kind, inputs)
    spec = AugmentSpec(kind, pad)
    return replay(inputs, random_params(spec, len(inputs), inputs.device), spec)
