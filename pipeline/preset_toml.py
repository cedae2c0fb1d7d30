"""A resolved preset written back as TOML (`kd config show`), every field with where its value came from.

text = to_toml(preset, origins(source, overrides))   # saved as my.toml, `--preset my.toml` resolves
                                                      # to the same settings
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import tomllib

from pipeline.config import Preset, flat_settings, load_preset, preset_path

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
GENERATED = ("mnist1d", "synthetic-images")  # the datasets whose size is dataset.num_samples


def origins(source: str, overrides: Mapping[str, Any]) -> dict[str, str]:
    """{dotted setting: where its value comes from}: "preset" (written in the file), "method default"
    (the preset's [method_defaults.<method>]), "command line", or "default" (the field's default)."""
    preset = load_preset(source)  # checks the file
    written = set(flat_settings(tomllib.loads(preset_path(source).read_text(encoding="utf-8"))))
    method = str(overrides.get("distill.method", preset.distill.method))
    defaults = set(preset.method_defaults.get(method, {}))
    out = {}
    for key in flat_settings(preset):
        out[key] = "default"
        if key in written:
            out[key] = "preset"
        if key in defaults:
            out[key] = f"method_defaults.{method}"
    for key in overrides:
        top = next((k for k in out if key == k or key.startswith(k + ".")), key)  # options.x -> options
        out[top] = "command line"
    return out


def to_toml(preset: Preset, where: Mapping[str, str] | None = None) -> str:
    """The preset as TOML: the settings a run uses (method defaults applied), then [compare] and [sweep];
    a comment after each value says where it came from. Unset optional settings are comments."""
    where = dict(where or {})
    defaults = flat_settings(Preset(name=preset.name))
    lines = [
        f"# kd config show: the resolved preset '{preset.name}' (method {preset.distill.method}, its method",
        "# defaults applied). After each value: where it came from, and the built-in default if different.",
        "# Saved as a .toml file, it resolves to these same settings.",
        f"name = {_value(preset.name)}",
    ]

    def table(prefix: str, obj: Any) -> None:
        scalars, subs = [], []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            (subs if dataclasses.is_dataclass(value) else scalars).append((f.name, value))
        lines.extend(["", f"[{prefix}]"])
        for name, value in scalars:
            key = f"{prefix}.{name}"
            origin = f"  # <- {where[key]}" if key in where else ""
            if origin and defaults.get(key) != value and defaults.get(key) is not None:
                origin += f" (default {_value(defaults[key])})"
            if key == "dataset.num_samples" and preset.dataset.name not in GENERATED:
                origin += f" (not used: {preset.dataset.name} has its own size)"
            if value is None:
                lines.append(f"# {name}: unset{origin.replace('  # <-', ' <-')}")
            else:
                lines.append(f"{_key(name)} = {_value(value)}{origin}")
        for name, value in subs:
            table(f"{prefix}.{name}", value)

    for section in ("dataset", "teacher", "student", "cache", "distill"):
        table(section, getattr(preset, section))
    for section in ("compare", "sweep"):
        entries = getattr(preset, section)
        if entries:
            lines.extend(["", f"[{section}]"])
            lines += [f"{_key(k)} = {_value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + " }"
            if value
            else "{}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
