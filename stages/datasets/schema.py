"""The two normalised tables every dataset is turned into, fixed as pyarrow schemas.

Coordinates are in original image pixels as the benchmarks annotate them: x to the right, y down, the
centre of pixel (col, row) at (col, row). Boxes are ``[x1, y1, x2, y2]``.
Paths are relative to the dataset's raw folder ``<data_root>/raw/<dataset>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from stages.evaluate.pck import THRESHOLD_KINDS

POINT = pa.list_(pa.float64(), 2)
POINTS = pa.list_(POINT)
BOX = pa.list_(pa.float64(), 4)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # unique within the dataset
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to <data_root>/raw/<dataset>
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("bbox", BOX),  # [x1, y1, x2, y2] in pixels, null when the dataset has none
        pa.field("mask_path", pa.string()),  # foreground mask, relative like path; null when none
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),  # unique within the dataset
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # trn | val | test (PF-PASCAL also: all)
        pa.field("category", pa.string(), nullable=False),  # TSS: the subset (FG3DCar, JODS, PASCAL)
        pa.field("src_image_id", pa.string(), nullable=False),
        pa.field("trg_image_id", pa.string(), nullable=False),
        pa.field("src_kps", POINTS, nullable=False),  # [K, 2] pixels; empty for flow-only pairs
        pa.field("trg_kps", POINTS, nullable=False),  # [K, 2] pixels, same order as src_kps
        pa.field("kps_ids", pa.list_(pa.int32()), nullable=False),  # semantic keypoint ids, [K]
        pa.field("threshold_kind", pa.string(), nullable=False),  # one of THRESHOLD_KINDS
        pa.field("src_bbox", BOX),
        pa.field("trg_bbox", BOX),
        pa.field("flip", pa.bool_(), nullable=False),  # mirrored pair (SPair mirror, TSS flip_gt)
        pa.field("viewpoint_variation", pa.int8()),  # SPair-71k: 0 easy, 1 medium, 2 hard
        pa.field("scale_variation", pa.int8()),  # SPair-71k: 0 easy, 1 medium, 2 hard
        pa.field("truncation", pa.int8()),  # SPair-71k: 0 none, 1 src, 2 trg, 3 both
        pa.field("occlusion", pa.int8()),  # SPair-71k: 0 none, 1 src, 2 trg, 3 both
        pa.field("flow_path", pa.string()),  # .flo on the source grid mapping src -> trg (TSS, demo)
        pa.field("direction", pa.string()),  # TSS: 1to2 | 2to1; null elsewhere
        pa.field("group", pa.string()),  # pairs scored together: TSS's pair folder; null elsewhere
        pa.field("variant", pa.string()),  # demo: normal | mirrored | smaller | larger; null elsewhere
    ]
)

BAD_ITEMS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("problem", pa.string(), nullable=False),
    ]
)

_PAIR_DEFAULTS: dict[str, Any] = {
    "src_kps": [],
    "trg_kps": [],
    "kps_ids": [],
    "flip": False,
}


def images_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build the images table from row dicts; missing nullable columns are null, types are enforced."""
    return _table(IMAGES_SCHEMA, rows, {})


def pairs_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build the pairs table from row dicts; keypoint lists default to empty and ``flip`` to False."""
    return _table(PAIRS_SCHEMA, rows, _PAIR_DEFAULTS)


def _table(schema: pa.Schema, rows: Iterable[Mapping[str, Any]], defaults: Mapping[str, Any]) -> pa.Table:
    rows = list(rows)
    unknown = {key for row in rows for key in row} - set(schema.names)
    if unknown:
        raise ValueError(f"columns not in the schema: {sorted(unknown)}")
    columns = {}
    for field_ in schema:
        values = [row.get(field_.name, defaults.get(field_.name)) for row in rows]
        if field_.name == "threshold_kind":
            bad = {v for v in values if v not in THRESHOLD_KINDS}
            if bad:
                raise ValueError(f"threshold_kind must be one of {tuple(THRESHOLD_KINDS)}, got {sorted(map(str, bad))}")
        columns[field_.name] = pa.array(values, type=field_.type)
    return pa.Table.from_pydict(columns, schema=schema)
