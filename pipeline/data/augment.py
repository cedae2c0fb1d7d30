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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import KDError

if TYPE_CHECKING:  # numpy and torch are imported where used: the settings (pipeline.config) load fast
    import numpy as np
    import torch

AUGMENTS = ("none", "crop-flip", "shift", "shift-zero")
AUGMENT_VERSION = 1  # of the parameter layout and replay below; a cache from another version is refused
PARAM_NAMES = {"crop-flip": ("dy", "dx", "flip"), "shift": ("offset",), "shift-zero": ("offset",)}


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
        """How many distinct views the augmentation has."""
        side = 2 * self.pad + 1
        return {"none": 1, "crop-flip": side * side * 2}.get(self.kind, side)

    def enumerate(self) -> np.ndarray:
        """Every view's parameters (space, P) int16, in a fixed order (view k of `views = "all"`)."""
        import numpy as np

        k = np.arange(self.space)
        side = 2 * self.pad + 1
        if self.kind == "crop-flip":
            return np.stack([k // (2 * side), (k // 2) % side, k % 2], 1).astype(np.int16)
        if self.kind in ("shift", "shift-zero"):
            return (k - self.pad)[:, None].astype(np.int16)
        return np.zeros((1, 0), dtype=np.int16)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "pad": self.pad, "params": list(PARAM_NAMES.get(self.kind, ()))}


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


def check_augment(kind: str, inputs: torch.Tensor) -> None:
    """Refuse, before any training, an augmentation that does not fit the data."""
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
