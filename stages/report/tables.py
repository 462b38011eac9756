"""The report's numbers: pandas tables computed from a run's Parquet result tables (pairs and keypoints).

Every PCK number follows the match stage's protocol and is averaged by the one aggregation of
:mod:`stages.evaluate.summary` (per image and per keypoint): a long PCK frame (one row per setting, pair and
alpha with ``n_correct``, ``n_kps`` and ``pck``) comes from :func:`~stages.evaluate.summary.pck_long` at the
run's alphas or from :func:`pck_at` at any alpha (from the keypoints table), and :func:`pck_table` averages it
per setting. Settings are told apart by their key (``setting``), shown by their label (``matcher``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import results
from stages.evaluate import summary

REPORT_ALPHA = 0.1  # the alpha of breakdowns, bars, histograms and picture ranking
CURVE_ALPHAS = np.linspace(0.0, 0.2, 81)  # the PCK-against-alpha curves, step 0.0025
FLOW_THRESHOLDS = (1, 5, 10)  # TSS kit thresholds shown: T1, T5 (the kit's headline) and T10
DIFFICULTY_COLUMNS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")  # SPair-71k
SETTING_KEYS = [
    "dataset", "backbone", "backbone_key", "random_weights", "setting", "matcher", "method",
    "params_json", "threshold_kind",
]  # fmt: skip
REFERENCE_METHODS = ("gwot", "nn")


@dataclass(frozen=True)
class RunResults:
    """A run's result tables: ``pairs`` and ``keypoints`` (with ``dataset`` and ``matcher`` columns)."""

    pairs: pd.DataFrame
    keypoints: pd.DataFrame


def load_run(run_folder: str | Path) -> RunResults:
    """Read every part of the run's pairs and keypoints tables, each label naming one setting per dataset
    (:func:`distinct_labels`)."""
    pairs = distinct_labels(results.read_results(run_folder, "pairs"))
    keypoints = results.read_results(run_folder, "keypoints")
    labels = pairs.drop_duplicates(["dataset", "setting"]).set_index(["dataset", "setting"])["matcher"]
    keys = pd.MultiIndex.from_frame(keypoints[["dataset", "setting"]])
    return RunResults(pairs, keypoints.assign(matcher=labels.reindex(keys).to_numpy()))


def distinct_labels(pairs: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` with the key appended to a label that several settings of a dataset share (``gwot
    (0c961a6f0b16)``: a catalog matcher edited between invocations of a run), so no table merges them."""
    shared = pairs.groupby(["dataset", "matcher"], observed=True)["setting"].transform("nunique") > 1
    if not shared.any():
        return pairs
    return pairs.assign(matcher=pairs["matcher"].where(~shared, pairs["matcher"] + " (" + pairs["setting"] + ")"))


def scored_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pair rows that have keypoints (the only ones PCK averages over)."""
    return pairs[pairs["n_kps"] > 0]


def pck_at(pairs: pd.DataFrame, keypoints: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """One row per scored (pair, setting): the pair's columns with ``alpha``, ``n_correct`` and ``pck`` at
    ``alpha``, counted from the keypoints table (``error <= alpha * ref_length``), so any alpha works."""
    correct = keypoints.assign(correct=keypoints["error"] <= alpha * keypoints["ref_length"])
    counts = correct.groupby(["dataset", "setting", "pair_id"], observed=True)["correct"].sum().rename("n_correct")
    scored = scored_pairs(pairs).drop(columns=["alphas", "n_correct", "pck"])
    long = scored.merge(counts.reset_index(), on=["dataset", "setting", "pair_id"], how="left", validate="1:1")
    long["n_correct"] = long["n_correct"].fillna(0).astype("int64")
    return long.assign(alpha=alpha, pck=long["n_correct"] / long["n_kps"])


def pck_table(long: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`stages.evaluate.summary.pck_table` of each setting (``SETTING_KEYS``) and each group of ``by``."""
    return summary.pck_table(long, [*SETTING_KEYS, *by])


def setting_scores(pairs: pd.DataFrame) -> pd.Series:
    """Per setting key: the mean over pairs of PCK at the run's alpha nearest ``REPORT_ALPHA``, or for a
    setting with flows only, the mean TSS-kit accuracy at T5."""
    scored = scored_pairs(pairs)
    position = scored["alphas"].map(lambda alphas: int(np.argmin(np.abs(np.asarray(alphas) - REPORT_ALPHA))))
    pck = pd.Series([p[i] for p, i in zip(scored["pck"], position, strict=True)], index=scored.index, dtype=float)
    flows = pairs[pairs["flow_accuracy"].notna()]
    t5 = pd.Series([a[4] for a in flows["flow_accuracy"]], index=flows.index, dtype=float)
    by_pck = pck.groupby(scored["setting"], observed=True).mean()
    return by_pck.combine_first(t5.groupby(flows["setting"], observed=True).mean())


def reference_settings(
    pairs: pd.DataFrame, defaults: Mapping[str, str] | None = None
) -> dict[tuple[str, str, str], str]:
    """``(dataset, backbone_key, method) -> setting key`` of the setting each method is represented by in
    comparisons, sweeps and pictures: a catalog matcher's own setting (``defaults``: matcher name -> its
    ``params_json`` in the catalog; without them, a setting labelled with its matcher's name), the method's
    namesake matcher (``gwot``, ``nn``) first; else the best by :func:`setting_scores`; ties by label."""
    columns = ["dataset", "backbone_key", "method", "setting", "matcher", "matcher_name", "params_json"]
    settings = pairs[columns].drop_duplicates(["dataset", "backbone_key", "setting"])
    if defaults is None:
        catalog_default = settings["matcher"] == settings["matcher_name"]
    else:
        catalog_default = settings["matcher_name"].map(defaults) == settings["params_json"]
    settings = settings.assign(
        not_default=~catalog_default,
        not_namesake=settings["matcher_name"] != settings["method"],
        minus_score=-settings["setting"].map(setting_scores(pairs)).fillna(-1.0),
    )
    order = ["not_default", "not_namesake", "minus_score", "matcher", "setting"]
    chosen = settings.sort_values(order).groupby(["dataset", "backbone_key", "method"], observed=True, sort=True)
    return {keys: group["setting"].iloc[0] for keys, group in chosen}


def gwot_minus_nn(headline: pd.DataFrame, references: Mapping[tuple[str, str, str], str]) -> pd.DataFrame:
    """For every GWOT setting, its PCK minus that of the reference NN setting of the same dataset and
    backbone at each alpha: columns ``dataset``, ``backbone``, ``backbone_key``, ``threshold_kind``,
    ``gwot_label``, ``nn_label``, ``alpha``, ``per_image``, ``per_keypoint`` (differences of fractions)."""
    nn_keys = {key for (_, _, method), key in references.items() if method == "nn"}
    keys = ["dataset", "backbone_key", "threshold_kind", "alpha"]
    values = [*keys, "matcher", "per_image", "per_keypoint"]
    nn = headline.loc[headline["setting"].isin(nn_keys), values]
    gwot = headline.loc[headline["method"] == "gwot", [*values, "backbone"]]
    both = gwot.merge(nn, on=keys, suffixes=("_gwot", "_nn"), validate="m:1")
    for averaging in ("per_image", "per_keypoint"):
        both[averaging] = both[f"{averaging}_gwot"] - both[f"{averaging}_nn"]
    both = both.rename(columns={"matcher_gwot": "gwot_label", "matcher_nn": "nn_label"})
    columns = ["dataset", "backbone", "backbone_key", "threshold_kind", "gwot_label", "nn_label", "alpha"]
    return both[[*columns, "per_image", "per_keypoint"]].sort_values(columns, ignore_index=True)


SUBSETS = ("normal", "mirrored", "smaller", "larger")  # the demo's variants; elsewhere pairs are normal or mirrored


def pair_subsets(pairs: pd.DataFrame) -> pd.Series:
    """Each pair's subset: its ``variant`` (the demo's normal / mirrored / smaller / larger) where it has one,
    else ``mirrored`` for flipped pairs (SPair's ``mirror``, TSS's ``flip_gt``) and ``normal`` otherwise."""
    fallback = pd.Series(np.where(pairs["flip"].astype(bool), "mirrored", "normal"), index=pairs.index)
    variant = pairs["variant"] if "variant" in pairs else pd.Series(None, index=pairs.index, dtype=object)
    return variant.where(variant.notna(), fallback).astype(str)


def subset_table(long: pd.DataFrame) -> pd.DataFrame:
    """:func:`pck_table` per subset (:func:`pair_subsets`), plus per setting and subset the share of pairs
    solved in the mirrored orientation (``mirrored_kept``) and the median estimated scale
    (``median_scale``; NaN where the setting estimates none)."""
    long = long.assign(subset=pair_subsets(long))
    table = pck_table(long, ["subset"])
    robust = (
        long[long["n_kps"] > 0]
        .assign(mirrored_kept=lambda f: f["orientation"].eq("mirrored").where(f["orientation"].notna()))
        .groupby(["dataset", "setting", "subset"], observed=True)
        .agg(mirrored_kept=("mirrored_kept", "mean"), median_scale=("scale_estimate", "median"))
        .reset_index()
    )
    table = table.merge(robust, on=["dataset", "setting", "subset"], how="left", validate="m:1")
    order = {name: index for index, name in enumerate(SUBSETS)}
    return table.sort_values(
        ["dataset", "subset", "matcher"],
        key=lambda c: c.map(order) if c.name == "subset" else c,
        ignore_index=True,
    )


def difficulty_tables(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``column -> pck_table`` grouped by each SPair-style difficulty column of ``DIFFICULTY_COLUMNS``,
    over the rows where it is known; columns null everywhere are left out."""
    return {
        column: pck_table(known.astype({column: "int64"}), [column])
        for column in DIFFICULTY_COLUMNS
        if not (known := long[long[column].notna()]).empty
    }


def flow_accuracy_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """TSS-kit flow accuracy of each setting per subset at ``FLOW_THRESHOLDS``, over all directions and
    without flipped pairs: columns ``SETTING_KEYS`` (less params_json), ``subset``, ``averaging``
    (all_directions | without_flip), ``n_pairs`` and ``T1``, ``T5``, ``T10`` (fractions)."""
    summarized = summary.summarize(pairs[pairs["flow_accuracy"].notna()])
    flow = summarized[summarized["metric"] == "flow_accuracy"].copy()
    flow["T"] = np.rint(flow["threshold"] * 100).astype("int64")
    flow = flow[flow["T"].isin(FLOW_THRESHOLDS)]
    keys = [key for key in SETTING_KEYS if key in flow.columns] + ["subset", "averaging", "n_pairs"]
    if flow.empty:
        return pd.DataFrame(columns=[*keys, *(f"T{t}" for t in FLOW_THRESHOLDS)])
    table = flow.pivot_table(index=keys, columns="T", values="value", aggfunc="first", observed=True)
    return table.rename(columns=lambda t: f"T{t}").reset_index().rename_axis(columns=None)


def pck_curves(pairs: pd.DataFrame, keypoints: pd.DataFrame, alphas: np.ndarray = CURVE_ALPHAS) -> pd.DataFrame:
    """Per-keypoint PCK of each setting at every alpha of ``alphas`` (correct: ``error <= alpha *
    ref_length``): columns ``dataset``, ``setting``, ``matcher``, ``method``, ``alpha``, ``pck``."""
    labels = pairs[["dataset", "setting", "matcher", "method"]].drop_duplicates(["dataset", "setting"])
    rows = []
    for (dataset, setting), group in keypoints.groupby(["dataset", "setting"], observed=True, sort=True):
        correct = group["error"].to_numpy()[:, None] <= alphas[None, :] * group["ref_length"].to_numpy()[:, None]
        rows.append(pd.DataFrame({"dataset": dataset, "setting": setting, "alpha": alphas, "pck": correct.mean(0)}))
    if not rows:
        return pd.DataFrame(columns=["dataset", "setting", "matcher", "method", "alpha", "pck"])
    curves = pd.concat(rows, ignore_index=True).merge(labels, on=["dataset", "setting"], how="left")
    return curves[["dataset", "setting", "matcher", "method", "alpha", "pck"]]


def swept_parameters(settings: pd.DataFrame) -> list[str]:
    """The parameters (keys of ``params_json``) whose value differs between the rows of ``settings``."""
    params = pd.DataFrame([json.loads(text) for text in settings["params_json"].drop_duplicates()])
    return [name for name in params.columns if params[name].astype(str).nunique() > 1]


def sweep_tables(table: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """``(dataset, backbone_key, method) -> rows of table`` for each method that a run holds in several
    settings, with one column per swept parameter (its value), sorted by those values."""
    sweeps = {}
    for keys, group in table.groupby(["dataset", "backbone_key", "method"], observed=True, sort=True):
        swept = swept_parameters(group)
        if not swept:
            continue
        params = pd.DataFrame([_parameters(text, swept) for text in group["params_json"]], index=group.index)
        sweeps[keys] = pd.concat([params, group], axis=1).sort_values([*swept, "matcher"], ignore_index=True)
    return sweeps


def _parameters(params_json: str, names: Sequence[str]) -> dict[str, Any]:
    params = json.loads(params_json)
    return {name: params.get(name) for name in names}


def ranked_pairs(at_alpha: pd.DataFrame, setting: str) -> pd.DataFrame:
    """The scored pairs of setting ``setting`` (a key) in a :func:`pck_at` frame, best PCK first (ties by pair id)."""
    rows = at_alpha[at_alpha["setting"] == setting]
    return rows.sort_values(["pck", "pair_id"], ascending=[False, True], ignore_index=True)


def best_median_worst(ranked: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """``(ranks, row)`` for the best, median and worst rows of a ranked frame; a pair that holds several
    ranks (fewer than three pairs) appears once, its ranks joined (``best, median``)."""
    if ranked.empty:
        return []
    positions = {"best": 0, "median": len(ranked) // 2, "worst": len(ranked) - 1}
    names: dict[int, list[str]] = {}
    for name, position in positions.items():
        names.setdefault(position, []).append(name)
    return [(", ".join(names[position]), ranked.iloc[position]) for position in sorted(names)]
