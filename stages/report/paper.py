"""The tables papers print: one row per matcher setting, the benchmarks' standard columns, best in bold,
with 95% bootstrap confidence intervals over pairs; and SPair-71k's per-category table.

Columns, for each benchmark the run holds (found by the catalog's dataset kind): SPair-71k PCK@0.1 (bbox),
PF-PASCAL PCK@0.05, 0.10 and 0.15, PF-WILLOW PCK@0.1, and TSS T5 of FG3DCar, JODS and PASCAL with their
average; any other dataset of the run (the demo) adds a PCK@0.1 column at its own threshold. PCK is
computed from the keypoints table as the match stage scores it (``error <= alpha * ref_length``, original
target pixels) under one stated averaging per table: per image (mean over pairs of each pair's fraction
correct) or per keypoint (all keypoints pooled). TSS T5 is the kit's flow accuracy at 5% of the target's
larger side, the mean over all directions of a subset; the average is the mean of the three subsets.

Intervals are percentile bootstraps: pairs (TSS: directions) are resampled with replacement, within each
subset for the TSS average, ``N_RESAMPLES`` times from a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.datasets.tss import SUBSETS as TSS_SUBSETS
from stages.report import tables
from stages.report.html import Block, Section, Strong, Table, Text

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
T5_INDEX = 4  # flow_accuracy holds T1..T50
THRESHOLD_NAMES = {"trg_bbox": "bbox", "trg_image": "img", "trg_kps": "kps"}
BENCHMARKS = {  # dataset kind -> (name in headers, PCK alphas); TSS is scored by flow
    "spair": ("SPair-71k", (0.1,)),
    "pf-pascal": ("PF-PASCAL", (0.05, 0.1, 0.15)),
    "pf-willow": ("PF-WILLOW", (0.1,)),
}
OTHER_ALPHA = 0.1  # the PCK column of a dataset of no paper benchmark
AVERAGINGS = {
    "per_image": "PCK per image: mean over pairs of each pair's fraction of correct keypoints",
    "per_keypoint": "PCK per keypoint: the correct keypoints of all pairs pooled",
}
PAPER_CSV = "paper-table.csv"
CATEGORIES_CSV = "paper-spair-categories.csv"
SETTING = ["setting", "matcher", "backbone", "backbone_key", "random_weights"]
NUMBER_COLUMNS = [*SETTING, "averaging", "column", "dataset", "value", "ci_low", "ci_high", "n_pairs"]


@dataclass(frozen=True)
class Column:
    """One column of the paper table: a dataset's PCK at ``alpha``, or TSS T5 over ``subsets`` (averaged)."""

    header: str
    dataset: str
    alpha: float | None = None  # PCK columns
    subsets: tuple[str, ...] = ()  # flow columns: the TSS subsets whose T5 is averaged


def bootstrap_interval(
    strata: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over strata of each stratum's weighted mean
    ``sum(v * w) / sum(w)``, resampling the ``(values [n], weights [n])`` of each stratum with replacement.

    Weights 1 give a plain mean (PCK per image); weights ``n_kps`` with values ``n_correct / n_kps`` give
    the pooled fraction (PCK per keypoint).
    """
    rng = np.random.default_rng(seed)
    statistics = np.zeros(n_resamples)
    for values, weights in strata:
        values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
        chunk = max(1, 2_000_000 // max(len(values), 1))  # bounded memory: at most ~16 MB of indices at once
        for start in range(0, n_resamples, chunk):
            index = rng.integers(0, len(values), size=(min(chunk, n_resamples - start), len(values)))
            picked = weights[index]
            statistics[start : start + len(index)] += (values[index] * picked).sum(1) / picked.sum(1)
    statistics /= len(strata)
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paper_columns(pairs: pd.DataFrame, kinds: Mapping[str, str]) -> list[Column]:
    """The columns for the datasets of a run (``kinds``: dataset name -> catalog kind), in paper order."""
    datasets = sorted(pairs["dataset"].unique())
    several = {kind: sum(kinds.get(d) == kind for d in datasets) > 1 for kind in set(kinds.values())}
    columns = []
    for kind, (name, alphas) in BENCHMARKS.items():
        for dataset in (d for d in datasets if kinds.get(d) == kind):
            label = f"{name} ({dataset})" if several[kind] else name
            columns += [Column(f"{label} PCK@{alpha:g}", dataset, alpha=alpha) for alpha in alphas]
    for dataset in (d for d in datasets if kinds.get(d) == "tss"):
        label = f"TSS ({dataset})" if several["tss"] else "TSS"
        columns += [Column(f"{label} {subset} T5", dataset, subsets=(subset,)) for subset in TSS_SUBSETS]
        columns.append(Column(f"{label} avg T5", dataset, subsets=TSS_SUBSETS))
    others = [d for d in datasets if kinds.get(d) not in (*BENCHMARKS, "tss")]
    columns += [Column(f"{dataset} PCK@{OTHER_ALPHA:g}", dataset, alpha=OTHER_ALPHA) for dataset in others]
    return columns


def _threshold_tag(rows: pd.DataFrame) -> str:
    kinds = sorted(rows["threshold_kind"].unique())
    return f" ({', '.join(THRESHOLD_NAMES.get(kind, kind) for kind in kinds)})"


def _cell(setting: dict, averaging: str, header: str, dataset: str, value: float, strata: list, n_pairs: int) -> dict:
    """One number of the paper table with its bootstrap interval (see :func:`bootstrap_interval`)."""
    low, high = bootstrap_interval(strata)
    cell = {"averaging": averaging, "column": header, "dataset": dataset, "value": float(value)}
    return {**setting, **cell, "ci_low": low, "ci_high": high, "n_pairs": n_pairs}


def _pck_cells(column: Column, pairs: pd.DataFrame, keypoints: pd.DataFrame) -> list[dict]:
    at = tables.pck_at(pairs[pairs["dataset"] == column.dataset], keypoints, column.alpha)
    if at.empty:
        return []
    header = column.header + _threshold_tag(at)
    cells = []
    for keys, rows in at.groupby(SETTING, observed=True, sort=True):
        setting = dict(zip(SETTING, keys, strict=True))
        for averaging in AVERAGINGS:
            if averaging == "per_image":
                value, strata = rows["pck"].mean(), [(rows["pck"].to_numpy(), np.ones(len(rows)))]
            else:
                value = rows["n_correct"].sum() / rows["n_kps"].sum()
                strata = [(rows["pck"].to_numpy(), rows["n_kps"].to_numpy())]
            cells.append(_cell(setting, averaging, header, column.dataset, value, strata, len(rows)))
    return cells


def _flow_cells(column: Column, pairs: pd.DataFrame) -> list[dict]:
    flows = pairs[(pairs["dataset"] == column.dataset) & pairs["flow_accuracy"].notna()]
    flows = flows[flows["category"].isin(column.subsets)]
    cells = []
    for keys, rows in flows.groupby(SETTING, observed=True, sort=True):
        strata = [
            (np.array([accuracy[T5_INDEX] for accuracy in group["flow_accuracy"]]), np.ones(len(group)))
            for _, group in rows.groupby("category", observed=True, sort=True)
        ]
        if len(strata) < len(column.subsets):  # an average of the subsets needs every subset
            continue
        value = float(np.mean([values.mean() for values, _ in strata]))
        setting = dict(zip(SETTING, keys, strict=True))
        cell = _cell(setting, "per_image", column.header, column.dataset, value, strata, len(rows))
        cells += [{**cell, "averaging": averaging} for averaging in AVERAGINGS]  # the same under both averagings
    return cells


def paper_numbers(pairs: pd.DataFrame, keypoints: pd.DataFrame, kinds: Mapping[str, str]) -> pd.DataFrame:
    """The paper table as numbers: one row per (averaging, setting, column) with ``value``, ``ci_low``,
    ``ci_high`` (fractions) and ``n_pairs`` (TSS: directions); columns in paper order."""
    cells = []
    for column in paper_columns(pairs, kinds):
        cells += _flow_cells(column, pairs) if column.subsets else _pck_cells(column, pairs, keypoints)
    return pd.DataFrame(cells, columns=NUMBER_COLUMNS)


def spair_category_numbers(pairs: pd.DataFrame, keypoints: pd.DataFrame, kinds: Mapping[str, str]) -> pd.DataFrame:
    """PCK@0.1 of each setting per SPair-71k category under both averagings: columns ``SETTING``,
    ``dataset``, ``category``, ``averaging``, ``value`` (a fraction) and ``n_pairs``."""
    spair = pairs[pairs["dataset"].map(lambda d: kinds.get(d) == "spair")]
    at = tables.pck_at(spair, keypoints, BENCHMARKS["spair"][1][0])
    rows = []
    for keys, group in at.groupby([*SETTING, "dataset", "category"], observed=True, sort=True):
        record = dict(zip([*SETTING, "dataset", "category"], keys, strict=True))
        rows += [
            {**record, "averaging": "per_image", "value": group["pck"].mean(), "n_pairs": len(group)},
            {
                **record,
                "averaging": "per_keypoint",
                "value": group["n_correct"].sum() / group["n_kps"].sum(),
                "n_pairs": len(group),
            },
        ]
    return pd.DataFrame(rows, columns=[*SETTING, "dataset", "category", "averaging", "value", "n_pairs"])


def _setting_name(rows: pd.DataFrame) -> pd.Series:
    random = rows["random_weights"].map({True: ", RANDOM weights", False: ""})
    return rows["matcher"] + " (" + rows["backbone"] + random + ")"


def _with_best_bold(wide: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """``wide`` (display strings) with each column's best value (at the shown precision) as Strong."""
    shown = wide.copy()
    for column in values.columns:
        rounded = (100 * values[column]).round(1)
        best = rounded.max()
        if pd.isna(best):
            continue
        for index in rounded.index[rounded == best]:
            shown.loc[index, column] = Strong(shown.loc[index, column])
    return shown


def display_table(numbers: pd.DataFrame, averaging: str, *, intervals: bool = True) -> pd.DataFrame:
    """One averaging of :func:`paper_numbers` as shown: a ``setting`` column, then one column per paper
    column with the value in % (and its 95% interval), the best of each column in bold."""
    rows = numbers[numbers["averaging"] == averaging].assign(setting=lambda frame: _setting_name(frame))
    order = list(dict.fromkeys(rows["column"]))
    values = rows.pivot_table(index="setting", columns="column", values="value", aggfunc="first")[order]
    text = rows.assign(
        cell=[
            f"{100 * v:.1f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if intervals else "")
            for v, lo, hi in zip(rows["value"], rows["ci_low"], rows["ci_high"], strict=True)
        ]
    ).pivot_table(index="setting", columns="column", values="cell", aggfunc="first")[order]
    shown = _with_best_bold(text.astype(object), values).fillna("-")
    return shown.reset_index().rename_axis(columns=None)


def category_table(categories: pd.DataFrame, dataset: str, averaging: str) -> pd.DataFrame:
    """The SPair-71k per-category table of one dataset and averaging: a row per setting, a column per
    category and ``all`` categories' mean, values in %, the best of each column in bold."""
    rows = categories[(categories["dataset"] == dataset) & (categories["averaging"] == averaging)]
    rows = rows.assign(setting=_setting_name(rows))
    values = rows.pivot_table(index="setting", columns="category", values="value", aggfunc="first")
    values["mean"] = values.mean(axis=1, skipna=False)
    text = values.map(lambda value: "-" if pd.isna(value) else f"{100 * value:.1f}").astype(object)
    return _with_best_bold(text, values).reset_index().rename_axis(columns=None)


def paper_section(
    folder: Path, pairs: pd.DataFrame, keypoints: pd.DataFrame, kinds: Mapping[str, str]
) -> tuple[Section | None, dict[str, pd.DataFrame]]:
    """The report's paper tables (None when the run has no scored pair) and their numbers by name
    (``paper``, ``paper_spair_categories``), also written as ``folder/paper-table.csv`` and
    ``folder/paper-spair-categories.csv`` (fractions; intervals as ``ci_low``, ``ci_high``)."""
    numbers = paper_numbers(pairs, keypoints, kinds)
    categories = spair_category_numbers(pairs, keypoints, kinds)
    numbers.to_csv(folder / PAPER_CSV, index=False)
    categories.to_csv(folder / CATEGORIES_CSV, index=False)
    found = {"paper": numbers, "paper_spair_categories": categories}
    if numbers.empty:
        return None, found
    blocks: list[Block] = [
        Text(
            "One row per matcher setting, values in %, the best of each column in bold, and its 95% bootstrap "
            f"confidence interval over pairs in brackets ({N_RESAMPLES} resamples). PCK: correct when the "
            "error <= alpha x the threshold's length (bbox: the target bbox's larger side; img: the target "
            "image's; kps: the target keypoints' larger extent), in original pixels. TSS: the kit's flow "
            "accuracy at 5% of the target's larger side, mean over all directions of a subset; avg = mean of "
            f"the three subsets. Numbers as CSV: {PAPER_CSV}."
        )
    ]
    by_averaging = numbers.pivot_table(index=[*SETTING, "column"], columns="averaging", values="value")
    shown = list(AVERAGINGS.items())
    if np.allclose(by_averaging["per_image"], by_averaging["per_keypoint"]):  # one table, not the same twice
        shown = [("per_image", "PCK per image = per keypoint (every pair has as many keypoints)")]
    blocks += [Table(display_table(numbers, averaging), f"Paper table, {statement}") for averaging, statement in shown]
    for (dataset, averaging), _ in categories.groupby(["dataset", "averaging"], sort=True):
        caption = f"{dataset}: PCK@0.1 (bbox) per category, {AVERAGINGS[averaging]}; mean = mean of the categories"
        blocks.append(Table(category_table(categories, dataset, averaging), caption))
    return Section("Paper tables", tuple(blocks)), found
