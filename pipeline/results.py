"""The Parquet result tables of a run: fixed schemas, part files, reading them back, the stored summary.

Layout of ``<outputs>/<run>/`` (hive-style partitions, so ``pd.read_parquet("<outputs>/<run>/pairs")``
reads every part with ``dataset``, ``matcher`` (the setting's label) and ``setting`` (its key) as columns)::

    pairs/dataset=<d>/matcher=<label>/setting=<key>/part-<batch:05d>.parquet      one row per (pair, setting)
    keypoints/dataset=<d>/matcher=<label>/setting=<key>/part-<batch:05d>.parquet  one row per (pair, keypoint)
    flows/<d>/<label>/<key>/<group>/flow<n>.flo                  predicted TSS flows, the kit's layout
    config.json   the resolved settings of every invocation, merged (settings are never dropped)
    summary.parquet, summary.md                                  both PCK averages, TSS accuracies

The label is the catalog matcher's name (``gwot``), with the swept values of a ``--set`` sweep
(``gwot[eps=0.02,k=3]``); the key, a hash of the method, its parameters and code version and the feature
store, tells apart settings that share a label (a catalog matcher whose parameters were edited between
runs, another backbone). Partition values are URI-escaped, as pyarrow reads them. The part files hold no
``dataset``, ``matcher`` or ``setting`` column: the partition folders give them. This module stores rows
and arrays; it knows nothing of how they were matched or are summarised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import atomic_path, atomic_write_bytes
from pipeline.damage import report_damage
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd

PARTITIONS = pa.schema(
    [pa.field("dataset", pa.string()), pa.field("matcher", pa.string()), pa.field("setting", pa.string())]
)
PROVENANCE_KEY = "provenance"  # the Parquet metadata key of a part's provenance record

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # TSS: the subset
        pa.field("src_image_id", pa.string(), nullable=False),
        pa.field("trg_image_id", pa.string(), nullable=False),
        pa.field("matcher_name", pa.string(), nullable=False),  # the catalog matcher (the label less its sweep)
        pa.field("method", pa.string(), nullable=False),  # nn | gwot
        pa.field("params_json", pa.string(), nullable=False),  # every parameter of the setting
        pa.field("backbone", pa.string(), nullable=False),  # the catalog backbone
        pa.field("backbone_key", pa.string(), nullable=False),  # the feature store's key
        pa.field("random_weights", pa.bool_(), nullable=False),  # True: features of an untrained network
        pa.field("batch", pa.int32(), nullable=False),  # the work unit the pair was matched in
        pa.field("n_kps", pa.int32(), nullable=False),
        pa.field("threshold_kind", pa.string(), nullable=False),  # trg_bbox | trg_image | trg_kps
        pa.field("ref_length", pa.float64()),  # the length alpha multiplies, target pixels; null: no kps
        pa.field("alphas", pa.list_(pa.float64()), nullable=False),  # [A]
        pa.field("n_correct", pa.list_(pa.int32()), nullable=False),  # [A] keypoints with error <= threshold
        pa.field("pck", pa.list_(pa.float64()), nullable=False),  # [A] n_correct / n_kps (NaN: no kps)
        pa.field("flip", pa.bool_(), nullable=False),
        pa.field("viewpoint_variation", pa.int8()),
        pa.field("scale_variation", pa.int8()),
        pa.field("truncation", pa.int8()),
        pa.field("occlusion", pa.int8()),
        pa.field("direction", pa.string()),  # TSS: 1to2 | 2to1
        pa.field("group", pa.string()),  # TSS: <subset>/<pair folder>
        pa.field("flow_accuracy", pa.list_(pa.float64())),  # [50] at T1..T50; null: no ground-truth flow
        pa.field("solve_seconds", pa.float64(), nullable=False),  # the batch's solve time / its pairs
        pa.field("variant", pa.string()),  # demo: normal | mirrored | smaller | larger; null elsewhere
        # flip/scale-aware GWOT (stages.match.robust); null for NN
        pa.field("orientation", pa.string()),  # the source orientation kept: original | mirrored
        pa.field("objective_original", pa.float64()),  # converged objective of the original orientation
        pa.field("objective_mirrored", pa.float64()),  # ... of the mirrored one; null without flip
        pa.field("scale_estimate", pa.float64()),  # estimated target / source object scale; null without scale
        pa.field("k_src", pa.int32()),  # neighbourhood sizes of the spatial term
        pa.field("k_trg", pa.int32()),
        # the GWOT solve kept for the pair (per-pair convergence); null for NN
        pa.field("outer_steps", pa.int32()),  # mirror-descent steps used
        pa.field("inner_iters", pa.int32()),  # Sinkhorn iterations used, over all its steps
        pa.field("objective", pa.float64()),  # the final objective E of the kept solve
        pa.field("marginal_error", pa.float64()),  # |T1 - a|_1 + |T^T1 - b|_1 of the final plan
        pa.field("converged", pa.bool_()),  # False: it used every outer step (raise outer_iters or eps)
    ]
)

KEYPOINTS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("kp_index", pa.int32(), nullable=False),  # position in the pair's keypoint lists
        pa.field("kps_id", pa.int32(), nullable=False),  # the dataset's semantic keypoint id
        pa.field("src_x", pa.float64(), nullable=False),
        pa.field("src_y", pa.float64(), nullable=False),
        pa.field("pred_x", pa.float64(), nullable=False),  # predicted target point, original pixels
        pa.field("pred_y", pa.float64(), nullable=False),
        pa.field("trg_x", pa.float64(), nullable=False),  # annotated target point
        pa.field("trg_y", pa.float64(), nullable=False),
        pa.field("error", pa.float64(), nullable=False),  # Euclidean, target pixels
        pa.field("ref_length", pa.float64(), nullable=False),  # correct at alpha iff error <= alpha * ref_length
        pa.field("threshold_kind", pa.string(), nullable=False),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("matcher", pa.string()),  # the setting's label, e.g. gwot[eps=0.02,k=3]
        pa.field("setting", pa.string()),  # the setting's key
        pa.field("method", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("backbone_key", pa.string()),
        pa.field("random_weights", pa.bool_()),
        pa.field("subset", pa.string()),  # "all", or the TSS subset its flow accuracies are averaged over
        pa.field("threshold_kind", pa.string()),  # what alpha (or T/100) multiplies: pck.THRESHOLD_KINDS
        pa.field("metric", pa.string()),  # pck | flow_accuracy
        pa.field("averaging", pa.string()),  # per_image | per_keypoint | all_directions | without_flip
        pa.field("threshold", pa.float64()),  # alpha, or T/100 for flows
        pa.field("value", pa.float64()),  # a fraction in [0, 1]
        pa.field("n_pairs", pa.int64()),  # pairs (flow: directions) averaged
        pa.field("n_keypoints", pa.int64()),
        pa.field("protocol", pa.string()),
    ]
)

TABLES = {"pairs": PAIRS_SCHEMA, "keypoints": KEYPOINTS_SCHEMA}


def run_dir(outputs: str | Path, run: str) -> Path:
    """The folder of run ``run`` under the outputs store."""
    return Path(outputs) / run


def _partition(name: str, value: str) -> str:
    """A hive partition folder ``name=value``, the value URI-escaped (as pyarrow unescapes it)."""
    return f"{name}={quote(value, safe='[]=,+')}"


def partition_dir(run_folder: str | Path, table: str, dataset: str, matcher: str, setting: str) -> Path:
    """The folder of one dataset's parts of ``table`` (pairs | keypoints) under one setting (label, key)."""
    if table not in TABLES:
        raise ValueError(f"unknown result table {table!r}; expected one of {', '.join(TABLES)}")
    parts = (_partition("dataset", dataset), _partition("matcher", matcher), _partition("setting", setting))
    return Path(run_folder, table, *parts)


def part_path(run_folder: str | Path, table: str, dataset: str, matcher: str, setting: str, batch: int) -> Path:
    """Where batch ``batch`` of one dataset and setting (``matcher``: its label, ``setting``: its key) writes
    its part of ``table`` (pairs | keypoints)."""
    return partition_dir(run_folder, table, dataset, matcher, setting) / f"part-{batch:05d}.parquet"


def flows_dir(run_folder: str | Path, dataset: str, matcher: str, setting: str) -> Path:
    """The folder of a setting's predicted flows, in the TSS kit's ``<subset>/<pair>/flowN.flo`` layout."""
    return Path(run_folder) / "flows" / dataset / quote(matcher, safe="[]=,+") / setting


def setting_labels(run_folder: str | Path, dataset: str, setting: str) -> list[str]:
    """The labels under which a run holds pairs parts of setting ``setting`` (a key) of ``dataset``."""
    folder = Path(run_folder, "pairs", _partition("dataset", dataset))
    if not folder.is_dir():
        return []
    found = (
        p for p in folder.iterdir() if p.name.startswith("matcher=") and (p / _partition("setting", setting)).is_dir()
    )
    return sorted(unquote(p.name.partition("=")[2]) for p in found)


class OldLayoutError(PipelineError):
    """A run holds result parts of the layout before ``setting=`` partitions, which this version does not read."""


def check_layout(run_folder: str | Path) -> None:
    """OldLayoutError when the run holds parts in the older ``dataset=<d>/matcher=<key>/part-*.parquet`` layout
    (the setting's key in the ``matcher`` folder), which would otherwise be silently left out."""
    for table in TABLES:
        old = next(Path(run_folder, table).glob("dataset=*/matcher=*/part-*.parquet"), None)
        if old is not None:
            raise OldLayoutError(
                f"{old.parent}: results of an older layout (the setting's key as the matcher folder), which this "
                f"version does not read; re-run the match stage into a new run (--run NEW), or delete "
                f"{Path(run_folder) / 'pairs'}, {Path(run_folder) / 'keypoints'} and {Path(run_folder) / '.done'} "
                "and re-run it"
            )


def write_part(
    path: str | Path, rows: Iterable[Mapping[str, Any]], schema: pa.Schema, provenance: Mapping[str, Any] | None = None
) -> None:
    """Write ``rows`` (dicts with the schema's columns) as one Parquet file, atomically; ``provenance`` (see
    :mod:`pipeline.provenance`) goes into the file's metadata, read back by :func:`read_provenance`."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    if provenance is not None:
        table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record a result part was written with (None for a part written without one)."""
    stored = (pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY.encode())
    return None if stored is None else json.loads(stored)


def read_results(run_folder: str | Path, table: str = "pairs") -> pd.DataFrame:
    """Every part of ``table`` in a run, with ``dataset``, ``matcher`` and ``setting`` columns from the partitions.

    Unlike a bare ``pd.read_parquet`` it fixes the partition columns as strings (a key of digits only
    would otherwise be read as a number) and returns an empty frame of the right columns before any part.
    A part that does not read back is reported and left out (set aside during a run: its batch is
    recomputed by the next match run). Parts of the older layout are an error (:func:`check_layout`).
    """
    check_layout(run_folder)
    folder = Path(run_folder) / table
    schema = pa.schema([*TABLES[table], *PARTITIONS])
    tables = []
    for path in sorted(folder.glob("dataset=*/matcher=*/setting=*/part-*.parquet")):
        part = read_part(path, table)  # read whole once: its checksums are verified on this very read
        if part is not None:
            values = [unquote(folder.name.partition("=")[2]) for folder in reversed(path.parents[:3])]
            columns = [pa.array([value] * part.num_rows, pa.string()) for value in values]
            tables.append(pa.Table.from_arrays([*part.columns, *columns], schema=schema))
    if not tables:
        return schema.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def read_part(path: str | Path, table: str) -> pa.Table | None:
    """One part file of ``table`` read whole, or None when it is absent or damaged (reported; set aside
    during a run, so that its batch counts as not done)."""
    schema = TABLES[table]
    try:
        # ParquetFile, not read_table: that imports pandas, which `pipeline status` has no use for
        with pq.ParquetFile(path, page_checksum_verification=True) as file:
            part = file.read()
        stored = set(part.column_names)  # a column added since the part was written reads as nulls
        columns = [part[f.name].cast(f.type) if f.name in stored else pa.nulls(len(part), f.type) for f in schema]
        return pa.Table.from_arrays(columns, schema=schema)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as error:
        report_damage(path, f"unreadable Parquet part ({type(error).__name__}: {error})", "recomputes its batch")
        return None


def read_batch(
    run_folder: str | Path, dataset: str, matcher: str, setting: str, batch: int, n_pairs: int
) -> dict[str, pa.Table] | None:
    """Both parts of a committed batch, read whole (by table name), or None when one is missing, damaged or
    its pairs part lacks some of the ``n_pairs`` rows: reported, so the batch is recomputed."""
    parts = {}
    for table in TABLES:
        path = part_path(run_folder, table, dataset, matcher, setting, batch)
        part = read_part(path, table)
        if part is None and not path.exists():
            report_damage(path, "the committed part is missing", "recomputes its batch")
        if part is None:
            return None
        if table == "pairs" and part.num_rows != n_pairs:
            report_damage(path, f"the part holds {part.num_rows} pairs, not {n_pairs}", "recomputes its batch")
            return None
        parts[table] = part
    return parts


def write_summary(run_folder: str | Path, summary: pd.DataFrame, markdown: str) -> None:
    """Store a run's summary (columns of ``SUMMARY_SCHEMA``) as ``summary.parquet`` and its Markdown table as
    ``summary.md``, both atomically."""
    table = pa.Table.from_pandas(summary[SUMMARY_SCHEMA.names], schema=SUMMARY_SCHEMA, preserve_index=False)
    with atomic_path(Path(run_folder) / "summary.parquet") as tmp:
        pq.write_table(table, tmp)
    atomic_write_bytes(Path(run_folder) / "summary.md", markdown.encode())


def read_run_config(run_folder: str | Path) -> dict[str, Any]:
    """The run's ``config.json`` ({} before the first invocation, or when it is damaged: reported)."""
    path = Path(run_folder) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as error:
        config = f"{type(error).__name__}: {error}"
    if isinstance(config, dict):
        return config
    report_damage(path, f"unreadable run config ({config})", "records the settings of its invocation afresh")
    return {}


def _merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(old)
    for key, value in new.items():
        both_mappings = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _merge(merged[key], value) if both_mappings else value
    return merged


def update_run_config(run_folder: str | Path, update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into the run's ``config.json`` (mappings merged key by key, so settings recorded
    by earlier invocations stay) and write it atomically; returns the merged config."""
    config = _merge(read_run_config(run_folder), update)
    atomic_write_bytes(Path(run_folder) / "config.json", (json.dumps(config, indent=1, default=str) + "\n").encode())
    return config
