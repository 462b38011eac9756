"""Scores averaged over pairs, in one place: PCK both ways and TSS flow accuracy, for the match summary and the report.

Frames in, frames out: the input is a run's pairs table (one row per pair and setting, with the per-pair
counts the match stage scored), the output one row per number, each labelled with its protocol. PCK
(:mod:`stages.evaluate.pck`): a keypoint is correct at ``alpha`` iff its error ``<= alpha * ref_length`` in
original target pixels; pairs without keypoints have no PCK and are left out of both averages:

- per image: the mean over pairs of each pair's fraction correct (GeoAware-SC, DIFT);
- per keypoint: the correct keypoints of all pairs pooled, over all their keypoints (SD+DINO).

Flow accuracy (:mod:`stages.evaluate.tss`): the TSS kit's T1..T50, the mean over directions, all of them and
those of pairs with ``flip_gt = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from stages.evaluate.pck import THRESHOLD_KINDS
from stages.evaluate.tss import THRESHOLDS_PERCENT

# A setting of a run, as the summary tells settings apart: matcher is its label, setting its key.
SETTING_COLUMNS = ["dataset", "matcher", "setting", "method", "backbone", "backbone_key", "random_weights"]
SUMMARY_COLUMNS = [
    *SETTING_COLUMNS, "subset", "threshold_kind", "metric", "averaging", "threshold", "value", "n_pairs",
    "n_keypoints", "protocol",
]  # fmt: skip
PCK_AVERAGINGS = {
    "per_image": "mean over pairs of each pair's fraction correct",
    "per_keypoint": "correct keypoints of all pairs pooled",
}


def pck_long(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (pair, alpha) with ``alpha``, ``n_correct`` and ``pck`` columns, for groupby analyses."""
    long = pairs.explode(["alphas", "n_correct", "pck"]).rename(columns={"alphas": "alpha"})
    return long.astype({"alpha": "float64", "n_correct": "int64", "pck": "float64"})


def pck_table(long: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """PCK of each group of ``keys`` at each alpha of a long PCK frame (:func:`pck_long`, one row per pair and
    alpha with ``pair_id``, ``n_kps``, ``n_correct``): the one place PCK is averaged over pairs.

    Columns: ``keys``, ``alpha``, ``n_pairs``, ``n_keypoints``, ``per_image`` (mean of the pairs' fractions
    correct) and ``per_keypoint`` (pooled), both fractions in [0, 1]; pairs without keypoints are left out.
    Sorted by ``keys`` and alpha.
    """
    scored = long[long["n_kps"] > 0]
    scored = scored.assign(fraction=scored["n_correct"] / scored["n_kps"])
    grouped = scored.groupby([*keys, "alpha"], observed=True, sort=True).agg(
        n_pairs=("pair_id", "size"),
        n_keypoints=("n_kps", "sum"),
        correct=("n_correct", "sum"),
        per_image=("fraction", "mean"),
    )
    grouped["per_keypoint"] = grouped["correct"] / grouped["n_keypoints"]
    return grouped.drop(columns="correct").reset_index()


def _pck_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    keys = [*SETTING_COLUMNS, "threshold_kind"]
    rows = pck_table(pck_long(pairs), keys).melt(
        id_vars=[*keys, "alpha", "n_pairs", "n_keypoints"], value_vars=list(PCK_AVERAGINGS), var_name="averaging"
    )
    rows["protocol"] = [
        f"PCK: correct if error <= alpha * {THRESHOLD_KINDS.get(kind, kind)}, in original image pixels; "
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
            for t, value in zip(THRESHOLDS_PERCENT, accuracy, strict=True):
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
    subset). One row per number, every row labelled with its protocol; columns ``SUMMARY_COLUMNS``."""
    parts = [frame for frame in (_pck_summary(pairs), _flow_summary(pairs)) if not frame.empty]
    if not parts:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    summary = pd.concat(parts, ignore_index=True)[SUMMARY_COLUMNS]
    return summary.astype({"threshold": "float64", "value": "float64", "n_pairs": "int64", "n_keypoints": "int64"})


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
        key = (row.dataset, row.subset, row.matcher, backbone, row.setting, row.threshold_kind)
        name = f"PCK@{row.threshold:g} {short[row.averaging]}" if row.metric == "pck" else f"T5 {short[row.averaging]}"
        table.setdefault(key, {})[name] = _percent(row.value)
    header = ["dataset", "subset", "matcher", "backbone", "setting", "threshold", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(table):
        lines.append("| " + " | ".join([*key, *(table[key].get(c, "-") for c in columns)]) + " |")
    kinds = "; ".join(f"{kind}: {length}" for kind, length in THRESHOLD_KINDS.items())
    notes = [
        "",
        f"PCK@alpha: correct if error <= alpha * the threshold's length ({kinds}), in original image pixels; "
        "img = mean over pairs of each pair's fraction correct, kp = all keypoints pooled. T5: TSS kit flow "
        "accuracy at 5% of the target's larger side, mean over directions (w/o flip: pairs with flip_gt = 0). "
        "Values in %. setting: the key that tells apart settings of one label (parameters, backbone, code).",
    ]
    return "\n".join(lines + notes) + "\n"
