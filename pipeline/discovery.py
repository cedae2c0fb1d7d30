"""Which cache a run reads: the one named (a path, zip or URL), else the newest complete match of the
preset's teacher and data under the cache root (local or remote), preferring the one stored as the
preset says; checked complete and against the data before the first batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.backends import is_url
from pipeline.cache import check_matches
from pipeline.config import DistillConfig, Paths, Preset, changed_settings
from pipeline.data.split import Split
from pipeline.errors import KDError
from pipeline.far_cache import open_far_cache
from pipeline.models import check_same_teacher
from pipeline.store import LogitStore, StorageInfo, find_caches


def find_train_cache(
    preset: Preset, paths: Paths, train: Split, cache: str | Path | None, *, required: bool
) -> LogitStore | None:
    """The train-split cache: the given path, zip or URL (read through a local copy), else the newest
    complete match under the cache root, preferring one stored as the preset says."""
    if cache is not None and is_url(cache):
        store = _far(str(cache), paths, preset.distill)
    elif cache is not None:
        store = LogitStore.open(cache)
    else:
        skipped: list[str] = []
        found = find_caches(
            paths.remote or paths.logits,
            dataset_fingerprint=train.fingerprint,
            split="train",
            teacher=preset.teacher.name,
            views=preset.cache.views_for("train"),  # the fixed view, or the preset's augmented views
            sparse=preset.cache.sparse_for(train),  # token sequences: the preset's k, temperatures, S
            skipped=skipped,
        )
        for problem in skipped:
            print(f"warning: skipping {problem}", file=sys.stderr, flush=True)
        # the one stage 1 makes (or hits) with this preset first, else the newest: a cache someone made
        # with other storage settings never takes over the preset's own, run after run
        found.sort(key=lambda s: not stored_as_preset(s.manifest.storage, preset))
        if found:  # found by teacher name: it must be the teacher the preset describes
            check_same_teacher(
                found[0].manifest.teacher.architecture, preset, f"the newest cache found ({found[0].where})"
            )
        if found and paths.remote:
            found = [_far(found[0].where, paths, preset.distill)]
        if not found:
            if not required:
                return None
            raise KDError(
                f"no complete train-split cache of teacher '{preset.teacher.name}' for this dataset"
                f"{_views_text(preset)} under {paths.logits}: run `kd teacher-logits --preset "
                f"{preset.command_name}{_cache_sets(preset)}` with the same --data-dir (or `make "
                "teacher-logits` in this repository), or pass --cache PATH"
            )
        store = found[0]
    store.require_complete()
    check_matches(store, train)
    return store


def _far(url: str, paths: Paths, cfg: DistillConfig) -> LogitStore:
    return open_far_cache(
        url, paths, memory_budget_mb=cfg.memory_budget_mb, remote_cache_mb=cfg.remote_cache_mb
    )


def stored_as_preset(storage: StorageInfo, preset: Preset) -> bool:
    """Whether a cache is stored as this preset's stage 1 stores (dtype, codec, level)."""
    c = preset.cache
    return (storage.dtype, storage.codec, storage.level) == (c.dtype, c.codec, c.zstd_level)


def _cache_sets(preset: Preset) -> str:
    """` --set cache.views=8 ...`: the cache settings this command changed, which stage 1 needs too."""
    if not preset.source:
        return ""
    changed = changed_settings(preset, preset.source)
    return "".join(f" --set {k}={v}" for k, v in changed.items() if k.startswith("cache."))


def _views_text(preset: Preset) -> str:
    c = preset.cache
    return "" if c.augment == "none" else f" with {c.views} {c.augment} views{c.augment_spec.pad_text}"


def existing_caches(preset: Preset, paths: Paths, data: dict[str, Split]) -> dict[str, str] | None:
    """{split: where} when every split has a complete cache of the preset's teacher (by name) for this
    data under the cache root (local, or the remote root), else None. Without the teacher's weights its
    fingerprint is unknown, so the teacher's name and the data's fingerprint decide, as in `kd distill`."""
    found = {}
    for name, split in data.items():
        skipped: list[str] = []
        stores = find_caches(
            paths.remote or paths.logits,
            dataset_fingerprint=split.fingerprint,
            split=name,
            teacher=preset.teacher.name,
            views=preset.cache.views_for(name),
            skipped=skipped,
        )
        for problem in skipped:
            print(f"warning: skipping {problem}", file=sys.stderr, flush=True)
        if not stores:
            return None
        found[name] = stores[0].where
    return found
