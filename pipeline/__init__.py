"""kd-cache: knowledge distillation from cached teacher logits. The public face, for your own loop:

    import pipeline
    cache = pipeline.open_cache("data/logits/<name>.zarr")   # folder, .zip, file:// or s3:// URL
    cache.check(ids=ids, labels=labels)                      # the data checks `kd distill` makes
    teacher = cache.targets(batch_ids, device=device)        # the teacher side, in the ids' order
    loss = pipeline.hinton_kd(student(x), teacher, y, temperature=4.0, alpha=0.9)

Names are imported from their modules on first use, so `import pipeline` stays light (no torch).
`stages` builds on this package; this package never imports `stages`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "pipeline.cache": ("Cache", "ViewTargets", "open_cache"),
    "pipeline.errors": ("KDError",),
    "pipeline.distill.losses": (
        "LOSSES",
        "annealing",
        "continuation",
        "cross_entropy",
        "dist",
        "dkd",
        "hinton_kd",
        "kl_terms",
        "skew_kl",
        "skew_rkl",
        "soft_kl",
    ),
    "pipeline.distill.targets": ("SparseTargets", "standardize"),
    "pipeline.distill.schedules": ("dkd_warmup", "interpolate", "phi", "step_temperature"),
    "pipeline.data.augment": ("cut_view", "replay"),
    "pipeline.adapters": ("KDTrainer", "TeacherCollator", "TeacherDataset"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
