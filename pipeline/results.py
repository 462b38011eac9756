"""The Parquet result tables of a run: fixed schemas, part files, reading them back, and the summaries.

Layout of ``<outputs>/<run>/`` (hive-style partitions, so ``pd.read_parquet("<outputs>/<run>/pairs")``
reads every part with ``dataset`` and ``matcher`` (the setting's key) as columns)::

    pairs/dataset=<d>/matcher=<key>/part-<batch:05d>.parquet      one row per (pair, setting)
    keypoints/dataset=<d>/matcher=<key>/part-<batch:05d>.parquet  one row per (pair, keypoint, setting)
    flows/<d>/<key>/<group>/flow<n>.flo                           predicted TSS flows, the kit's layout
    config.json   the resolved settings of every invocation, merged (settings are never dropped)
    summary.parquet, summary.md                                    both PCK averages, TSS accuracies

The part files hold no ``dataset`` or ``matcher`` column: the partition folders give them. This module
stores rows and arrays; it knows nothing of how they were matched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import atomic_path, atomic_write_bytes
from pipeline.damage import report_damage

PARTITIONS = pa.schema([pa.field("dataset", pa.string()), pa.field("matcher", pa.string())])
PROVENANCE_KEY = "provenance"  # the Parquet metadata key of a part's provenance record
FLOW_THRESHOLDS = tuple(range(1, 51))  # the TSS kit's T1..T50: percent of the target image's larger side

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # TSS: the subset
        pa.field("src_image_id", pa.string(), nullable=False),
        pa.field("trg_image_id", pa.string(), nullable=False),
        pa.field("matcher_name", pa.string(), nullable=False),  # the catalog matcher
        pa.field("matcher_label", pa.string(), nullable=False),  # e.g. gwot[eps=0.02,k=3]
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
        pa.field("matcher", pa.string()),  # the setting's key
        pa.field("matcher_label", pa.string()),
        pa.field("method", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("backbone_key", pa.string()),
        pa.field("random_weights", pa.bool_()),
        pa.field("subset", pa.string()),  # "all", or the TSS subset its flow accuracies are averaged over
        pa.field("threshold_kind", pa.string()),  # what alpha (or T/100) multiplies: see REFERENCE_LENGTHS
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
SETTING_COLUMNS = ["dataset", "matcher", "matcher_label", "method", "backbone", "backbone_key", "random_weights"]
REFERENCE_LENGTHS = {
    "trg_bbox": "max(w, h) of the target bbox",
    "trg_image": "max(W, H) of the target image",
    "trg_kps": "the larger extent of the target keypoints",
}
PCK_AVERAGINGS = {
    "per_image": "mean over pairs of each pair's fraction correct",
    "per_keypoint": "correct keypoints of all pairs pooled",
}


def run_dir(outputs: str | Path, run: str) -> Path:
    """The folder of run ``run`` under the outputs store."""
    return Path(outputs) / run


def part_path(run_folder: str | Path, table: str, dataset: str, matcher_key: str, batch: int) -> Path:
    """Where batch ``batch`` of one dataset and setting writes its part of ``table`` (pairs | keypoints)."""
    if table not in TABLES:
        raise ValueError(f"unknown result table {table!r}; expected one of {', '.join(TABLES)}")
    return Path(run_folder) / table / f"dataset={dataset}" / f"matcher={matcher_key}" / f"part-{batch:05d}.parquet"


def flows_dir(run_folder: str | Path, dataset: str, matcher_key: str) -> Path:
    """The folder of a setting's predicted flows, in the TSS kit's ``<subset>/<pair>/flowN.flo`` layout."""
    return Path(run_folder) / "flows" / dataset / matcher_key


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
    """Every part of ``table`` in a run, with ``dataset`` and ``matcher`` columns from the partitions.

    Unlike a bare ``pd.read_parquet`` it fixes the partition columns as strings (a key of digits only
    would otherwise be read as a number) and returns an empty frame of the right columns before any part.
    A part that does not read back is reported and left out (set aside during a run: its batch is
    recomputed by the next match run).
    """
    folder = Path(run_folder) / table
    schema = pa.schema([*TABLES[table], *PARTITIONS])
    tables = []
    for path in sorted(folder.glob("dataset=*/matcher=*/part-*.parquet")):
        part = read_part(path, table)  # read whole once: its checksums are verified on this very read
        if part is not None:
            dataset, matcher = (folder.name.partition("=")[2] for folder in (path.parents[1], path.parent))
            columns = [pa.array([value] * part.num_rows, pa.string()) for value in (dataset, matcher)]
            tables.append(pa.Table.from_arrays([*part.columns, *columns], schema=schema))
    if not tables:
        return schema.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def read_part(path: str | Path, table: str) -> pa.Table | None:
    """One part file of ``table`` read whole, or None when it is absent or damaged (reported; set aside
    during a run, so that its batch counts as not done)."""
    try:
        return pq.read_table(path, schema=TABLES[table], page_checksum_verification=True)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as error:
        report_damage(path, f"unreadable Parquet part ({type(error).__name__}: {error})", "recomputes its batch")
        return None


def batch_intact(run_folder: str | Path, dataset: str, matcher_key: str, batch: int, n_pairs: int) -> bool:
    """Whether both parts of a committed batch read back, its pairs part with ``n_pairs`` rows; a missing
    or damaged part is reported, so the batch is recomputed."""
    for table in TABLES:
        path = part_path(run_folder, table, dataset, matcher_key, batch)
        part = read_part(path, table)
        if part is None and not path.exists():
            report_damage(path, "the committed part is missing", "recomputes its batch")
        if part is None:
            return False
        if table == "pairs" and part.num_rows != n_pairs:
            report_damage(path, f"the part holds {part.num_rows} pairs, not {n_pairs}", "recomputes its batch")
            return False
    return True


def pck_long(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (pair, alpha) with ``alpha``, ``n_correct`` and ``pck`` columns, for groupby analyses."""
    long = pairs.explode(["alphas", "n_correct", "pck"]).rename(columns={"alphas": "alpha"})
    return long.astype({"alpha": "float64", "n_correct": "int64", "pck": "float64"})


def _pck_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    long = pck_long(pairs[pairs["n_kps"] > 0])
    long["fraction"] = long["n_correct"] / long["n_kps"]
    keys = [*SETTING_COLUMNS, "threshold_kind", "alpha"]
    grouped = long.groupby(keys, observed=True, sort=True).agg(
        per_image=("fraction", "mean"),
        correct=("n_correct", "sum"),
        n_keypoints=("n_kps", "sum"),
        n_pairs=("pair_id", "size"),
    )
    grouped["per_keypoint"] = grouped["correct"] / grouped["n_keypoints"]
    rows = grouped.reset_index().melt(
        id_vars=[*keys, "n_pairs", "n_keypoints"],
        value_vars=["per_image", "per_keypoint"],
        var_name="averaging",
    )
    rows["protocol"] = [
        f"PCK: correct if error <= alpha * {REFERENCE_LENGTHS.get(kind, kind)}, in original image pixels; "
        + PCK_AVERAGINGS[how]
        for kind, how in zip(rows["threshold_kind"], rows["averaging"], strict=True)
    ]
    return rows.assign(subset="all", metric="pck").rename(columns={"alpha": "threshold"})


def _flow_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    scored = pairs[pairs["flow_accuracy"].notna()].copy()
    scored["subset"] = scored["category"].where(scored["group"].notna(), "all")
    out = []
    for keys, group in scored.groupby([*SETTING_COLUMNS, "subset"], observed=True, sort=True):
        for averaging, rows in (("all_directions", group), ("without_flip", group[~group["flip"]])):
            if rows.empty:
                continue
            accuracy = np.stack(rows["flow_accuracy"].to_numpy()).mean(axis=0)
            for t, value in zip(FLOW_THRESHOLDS, accuracy, strict=True):
                out.append(
                    {
                        **dict(zip([*SETTING_COLUMNS, "subset"], keys, strict=True)),
                        "threshold_kind": "trg_image",
                        "metric": "flow_accuracy",
                        "averaging": averaging,
                        "threshold": t / 100,
                        "value": float(value),
                        "n_pairs": len(rows),
                        "n_keypoints": 0,
                        "protocol": "TSS kit: share of known ground-truth pixels with error <= T/100 * max(H, W) "
                        "of the target image, in original pixels; mean over directions"
                        + (" of pairs with flip_gt = 0" if averaging == "without_flip" else ""),
                    }
                )
    return pd.DataFrame(out)


def summarize(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and setting: PCK at every alpha averaged per image and per keypoint, and for rows with
    a ground-truth flow the mean accuracy at T1..T50 over all directions and without flipped pairs (per TSS
    subset). One row per number, every row labelled with its protocol; columns of ``SUMMARY_SCHEMA``."""
    parts = [frame for frame in (_pck_summary(pairs), _flow_summary(pairs)) if not frame.empty]
    if not parts:
        return SUMMARY_SCHEMA.empty_table().to_pandas()
    summary = pd.concat(parts, ignore_index=True)[SUMMARY_SCHEMA.names]
    return pa.Table.from_pandas(summary, schema=SUMMARY_SCHEMA, preserve_index=False).to_pandas()


def _percent(value: float) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.1f}"


def summary_markdown(summary: pd.DataFrame) -> str:
    """A Markdown table of a summary: one row per dataset, subset and setting; PCK at each alpha per image
    ("img") and per keypoint ("kp"), TSS flow accuracy at T5 (all directions, w/o flip); values in %."""
    if summary.empty:
        return "No results yet.\n"
    pck = summary[summary["metric"] == "pck"]
    flow = summary[(summary["metric"] == "flow_accuracy") & np.isclose(summary["threshold"], 0.05)]
    alphas = sorted(pck["threshold"].unique())
    columns = [f"PCK@{alpha:g} {short}" for alpha in alphas for short in ("img", "kp")]
    if not flow.empty:
        columns += ["T5 all", "T5 w/o flip"]
    short = {"per_image": "img", "per_keypoint": "kp", "all_directions": "all", "without_flip": "w/o flip"}
    table: dict[tuple, dict[str, str]] = {}
    for row in pd.concat([pck, flow]).itertuples(index=False):
        backbone = row.backbone + (" (RANDOM weights)" if row.random_weights else "")
        key = (row.dataset, row.subset, row.matcher_label, backbone, row.matcher, row.threshold_kind)
        name = f"PCK@{row.threshold:g} {short[row.averaging]}" if row.metric == "pck" else f"T5 {short[row.averaging]}"
        table.setdefault(key, {})[name] = _percent(row.value)
    header = ["dataset", "subset", "matcher", "backbone", "key", "threshold", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(table):
        lines.append("| " + " | ".join([*key, *(table[key].get(c, "-") for c in columns)]) + " |")
    kinds = "; ".join(f"{kind}: {REFERENCE_LENGTHS[kind]}" for kind in REFERENCE_LENGTHS)
    notes = [
        "",
        f"PCK@alpha: correct if error <= alpha * the threshold's length ({kinds}), in original image pixels; "
        "img = mean over pairs of each pair's fraction correct, kp = all keypoints pooled. T5: TSS kit flow "
        "accuracy at 5% of the target's larger side, mean over directions (w/o flip: pairs with flip_gt = 0). "
        "Values in %.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_summary(run_folder: str | Path, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Summarise every pair result of the run (``pairs``: the run's pairs table, when already read) into
    ``summary.parquet`` and ``summary.md``; returns it."""
    run_folder = Path(run_folder)
    summary = summarize(read_results(run_folder, "pairs") if pairs is None else pairs)
    with atomic_path(run_folder / "summary.parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(summary, schema=SUMMARY_SCHEMA, preserve_index=False), tmp)
    atomic_write_bytes(run_folder / "summary.md", summary_markdown(summary).encode())
    return summary


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
