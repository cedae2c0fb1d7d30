"""Run identity and run folders: which settings identify a run (the ones its method reads), its default
name, and the refusal to write a run into a folder holding another one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import strict_json
from pipeline.config import Preset, flat_settings
from pipeline.distill.methods import ignored_settings, soft_settings
from pipeline.errors import KDError


def finished_summary(run_dir: Path, preset: Preset) -> dict[str, Any] | None:
    """A finished run's summary if it was made with exactly this resolved preset (else None: rerun it)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    saved = config.get("preset")
    return summary if isinstance(saved, dict) and used_settings(saved) == used_settings(preset) else None


READING = ("dataset.memory_budget_mb", "dataset.workers")  # settings of how inputs are read, not which


def trained_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Overrides less the ones that only change how inputs are read (READING): what names a report."""
    return {k: v for k, v in (overrides or {}).items() if k not in READING}


def used_settings(preset: Preset | dict[str, Any]) -> dict[str, Any]:
    """flat_settings without the ones the preset's method ignores (T for annealing, alpha for dkd, the
    other methods' sub-tables, ...): what identifies a run. Two presets equal here train the same."""
    # a setting added after a run was saved counts at its default, so older runs are still recognised
    flat = flat_settings(Preset(name="")) | flat_settings(preset)
    ignored = ignored_settings(flat["distill.method"])  # the other methods' tables; T, alpha if unread
    ignored.append("distill.remote_cache_mb")  # where far shards are kept: never what is trained
    ignored += list(READING)  # how inputs are read, never which
    if flat["dataset.name"] != "lm-text":  # the sparse (token-level) targets apply to language models
        ignored += ["distill.sparse_target"]
        if flat["cache.layout"] == "dense":  # and the sparse layout's settings to sparse caches
            ignored += ["cache.topk", "cache.lse_temperatures", "cache.samples", "cache.sample_seed"]
            ignored.append("distill.sparse_exact")
    else:
        ignored.append("cache.layout")  # language models: always the sparse layout
    if flat["cache.augment"] == "none":  # the fixed view: the view settings mean nothing
        ignored += ["cache.views", "cache.view_seed", "cache.augment_pad", "distill.views"]
    for stage in ("teacher", "distill"):
        if flat[f"{stage}.train.augment"] == "none":
            ignored.append(f"{stage}.train.augment_pad")
    return {k: v for k, v in flat.items() if not any(k.startswith(prefix) for prefix in ignored)}


_NAME_PARTS = {"temperature": "T", "alpha": "a", "ce_weight": "ce", "kd_weight": "kd"}


def default_run_name(preset: Preset, changes: dict[str, Any] | None = None) -> str:
    """`<preset>-<method>[-T<T>][-a<alpha> | -ce<w>-kd<w>]-s<seed>` (only the settings the method uses),
    plus a short hash of any other setting changed from the preset file, so runs with different settings
    never share a folder."""
    cfg = preset.distill
    shown = soft_settings(cfg)
    soft = "".join(f"-{_NAME_PARTS[k]}{v:g}" for k, v in shown.items())
    soft += "-zscore" if cfg.standardize else ""  # logit standardization
    named = {"distill.method", "distill.seed", "distill.standardize", *(f"distill.{k}" for k in shown)}
    if preset.dataset.name == "lm-text" and cfg.method == "kd":  # which teacher target: in the name
        soft = f"-{'online' if cfg.teacher_online else cfg.sparse_target}{soft}"
        named |= {"distill.sparse_target", "distill.teacher_online"}
    used = used_settings(preset)
    rest = {k: v for k, v in (changes or {}).items() if k not in named and k in used}
    tag = (
        "-" + hashlib.sha256(strict_json.dumps(sorted(rest.items())).encode()).hexdigest()[:6] if rest else ""
    )
    return f"{preset.name}-{cfg.method}{soft}-s{cfg.seed}{tag}"


def describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def check_run_folder(run_dir: Path, preset: Preset, cache_key: str | None = None) -> None:
    """Refuse to write into a folder holding anything but a run of exactly this resolved preset and, once
    the cache is open (`cache_key`), of the same cache: `--cache` of another teacher or dump under the
    same settings would rewrite it. Runs from before keys were recorded, and online runs, have none."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    try:
        config = json.loads((run_dir / "config.json").read_text())
        previous = config["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        raise KDError(
            f"{run_dir} exists and is not a run folder of kd: not writing into it; "
            "pass --run-name NAME (or remove that folder)"
        ) from None
    old, new = used_settings(previous) if isinstance(previous, dict) else {}, used_settings(preset)
    if old == new:  # the same experiment again (settings its method ignores aside): its folder is rewritten,
        theirs = config.get("cache_key")  # unless it learnt from another cache
        if theirs and cache_key and theirs != cache_key:
            raise KDError(
                f"run folder {run_dir} holds a run of these settings from another cache "
                f"({config.get('cache')}, key {theirs[:12]}; this one {cache_key[:12]}): not replacing it; "
                "pass --run-name NAME for a new folder"
            )
        return
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    differ.sort(key=lambda k: k != "distill.method")  # a method change first: the others follow from it
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:3])
    raise KDError(
        f"run folder {run_dir} holds a run with other settings ({shown}"
        f"{', ...' if len(differ) > 3 else ''}): not replacing it; pass --run-name NAME for a new folder"
    )
