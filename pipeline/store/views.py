"""The views layout: K augmented views per sample, the teacher's logits of each and the parameters that
replay it (pipeline/data/augment.py). Same group, manifest, shards, checksums and lock as the dense layout:

    logits/   (N, K, C) in the storage dtype; chunks (R, K, C), shards (S*R, K, C)
    views/    (N, K, P) int16: view k of row i is augment(input_i, views[i, k]); chunked like labels

The manifest's `views` entry names the augmentation, its parameter layout version, K and the view seed;
the views array is covered by each shard's CRC32C.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zarr

from pipeline.data.augment import AUGMENT_VERSION, AUGMENTS, AugmentSpec, views_record
from pipeline.errors import KDError
from pipeline.store.encoding import compressors
from pipeline.store.manifest import Manifest

__all__ = ["augment_spec", "create_views_array", "expected_views_shape", "views_record"]


def augment_spec(views: Mapping[str, Any], where: str) -> AugmentSpec:
    """The augmentation of a manifest's views entry ({}: none), refused in one line when this kd cannot
    replay it."""
    if not views:
        return AugmentSpec("none")
    augment = views.get("augment", {})
    kind = augment.get("kind") if isinstance(augment, Mapping) else None
    if views.get("version") != AUGMENT_VERSION or kind not in AUGMENTS:
        raise KDError(
            f"cache {where} holds views of augmentation {kind!r} version {views.get('version')}, which this "
            f"kd cannot replay (it replays version {AUGMENT_VERSION} of {', '.join(AUGMENTS[1:])}): "
            "upgrade kd, or re-run `kd teacher-logits` with this version"
        )
    return AugmentSpec(kind, int(augment.get("pad", 4)))


def create_views_array(group: zarr.Group, manifest: Manifest, where: str) -> None:
    n, k, st = manifest.dataset.length, manifest.num_views, manifest.storage
    p = augment_spec(manifest.views, where).num_params
    group.create_array(
        "views",
        shape=(n, k, p),
        chunks=(st.shard_rows, k, p),  # one chunk per shard: still one writer per shard
        shards=(st.shard_rows, k, p),
        dtype="int16",
        compressors=compressors(st.codec, st.level, 2),
        fill_value=0,
    )


def expected_views_shape(manifest: Manifest) -> tuple[int, int, int]:
    return (manifest.dataset.length, manifest.num_views, len(manifest.views["augment"].get("params", [])))
