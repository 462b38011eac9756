"""Match pictures of a run: the best, median and worst pairs of a dataset, drawn for GWOT and for NN.

Pairs are ranked by the per-pair PCK at ``tables.REPORT_ALPHA`` of the dataset's reference GWOT setting
(NN when the run has no GWOT); each chosen pair is drawn for every reference setting: source keypoints
joined to their predictions, green where correct at that alpha and red where not, the annotated target
points as circles. A TSS direction also gets its source warped by the stored predicted flow beside the
target. Images come from the normalised tables: ``<data_root>/raw/<dataset>/<images.parquet path>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import results
from pipeline.catalog import Catalog
from stages.datasets.flo import read_flo
from stages.report import tables
from stages.report.draw import draw_correspondences, draw_warp
from stages.report.html import Block, Picture, Text

PICTURE_HEIGHT = 360  # both images at this height (or the taller one's, when smaller): light pages


def slug(text: str) -> str:
    """``text`` as a safe file-name part (pair ids hold ``/``, labels ``[=,]``)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def percent(value: float) -> str:
    """A fraction as a percentage with one decimal; ``-`` for a missing value."""
    return "-" if pd.isna(value) else f"{100 * value:.1f}"


class DatasetImages:
    """A dataset's normalised images by image id, read once each as ``[H, W, 3]`` uint8 RGB arrays.

    Raises FileNotFoundError when the dataset's ``images.parquet`` is not in the catalog's data root.
    """

    def __init__(self, catalog: Catalog, dataset: str):
        self.raw_dir = catalog.raw_dir(dataset)
        table = pd.read_parquet(catalog.normalized_dir(dataset) / "images.parquet", columns=["image_id", "path"])
        self.paths = dict(zip(table["image_id"], table["path"], strict=True))
        self.loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, image_id: str) -> np.ndarray:
        if image_id not in self.loaded:
            with Image.open(self.raw_dir / self.paths[image_id]) as image:
                self.loaded[image_id] = np.asarray(image.convert("RGB"))
        return self.loaded[image_id]


def pair_notes(pair: Mapping[str, Any]) -> str:
    """A caption's marks for a pair: its subset unless normal, and what a flip/scale-aware setting decided
    (`` [smaller; solved mirrored; scale 0.52]``); empty for a normal pair under a plain setting."""
    notes = []
    subset = tables.pair_subsets(pd.DataFrame([dict(pair)])).iloc[0]
    if subset != "normal":
        notes.append(f"{subset} pair")
    if pair.get("orientation") == "mirrored":
        notes.append("solved with the source mirrored")
    scale = pair.get("scale_estimate")
    if scale is not None and not pd.isna(scale):
        notes.append(f"estimated scale {scale:.2f}")
    return f" [{'; '.join(notes)}]" if notes else ""


def pair_pictures(
    folder: Path,
    run_folder: Path,
    images: DatasetImages,
    pair: Mapping[str, Any],
    keypoints: pd.DataFrame,
    stem: str,
) -> list[Picture]:
    """Draw one (pair, setting) into ``folder/<stem>.png`` and, for a TSS direction with a stored flow,
    ``<stem>-warp.png``. ``pair`` is a :func:`tables.pck_at` row (as a mapping), ``keypoints`` its keypoint
    rows."""
    alpha = tables.REPORT_ALPHA
    points = keypoints.sort_values("kp_index")
    src, trg = images[pair["src_image_id"]], images[pair["trg_image_id"]]
    label, pair_id, pck = pair["matcher"], pair["pair_id"], percent(pair["pck"])
    draw_correspondences(
        src,
        trg,
        points[["src_x", "src_y"]].to_numpy(),
        points[["pred_x", "pred_y"]].to_numpy(),
        true_points=points[["trg_x", "trg_y"]].to_numpy(),
        correct=(points["error"] <= alpha * points["ref_length"]).to_numpy(),
        title=f"{label} {pck}%",
        height=min(max(src.shape[0], trg.shape[0]), PICTURE_HEIGHT),
        path=folder / f"{stem}.png",
    )
    caption = (
        f"{label}: {pair_id}{pair_notes(pair)}, PCK@{alpha:g} = {pck}% (green: correct, red: wrong, circles: truth)"
    )
    drawn = [Picture(f"{stem}.png", caption)]
    if isinstance(pair["direction"], str) and isinstance(pair["group"], str):
        flows = results.flows_dir(run_folder, pair["dataset"], pair["matcher"], pair["setting"]) / pair["group"]
        flo = flows / f"flow{pair['direction'][0]}.flo"  # TSS: flow1 starts from image1 (direction 1to2)
        if flo.is_file():
            draw_warp(src, trg, read_flo(flo), title=label, path=folder / f"{stem}-warp.png")
            drawn.append(Picture(f"{stem}-warp.png", f"{label}: {pair_id}, source warped by the predicted flow"))
    return drawn


def subset_pictures(
    catalog: Catalog, folder: Path, run_folder: Path, keypoints: pd.DataFrame, at_alpha: pd.DataFrame
) -> list[Block]:
    """For every dataset with mirrored or rescaled pairs: the first pair of each subset (normal, mirrored,
    smaller, larger) drawn under every setting of the run, side by side."""
    blocks: list[Block] = []
    at_alpha = at_alpha.assign(subset=tables.pair_subsets(at_alpha))
    points = dict(tuple(keypoints.groupby(["dataset", "setting", "pair_id"], observed=True)))
    for (dataset, backbone_key), rows in at_alpha.groupby(["dataset", "backbone_key"], sort=True):
        if set(rows["subset"]) == {"normal"}:
            continue
        try:
            images = DatasetImages(catalog, dataset)
        except FileNotFoundError as error:
            blocks.append(
                Text(f"{dataset}: no subset pictures, the normalised images are not here ({error.filename}).")
            )
            continue
        for subset in [name for name in tables.SUBSETS if name in set(rows["subset"])]:
            pair_id = min(rows.loc[rows["subset"] == subset, "pair_id"])
            blocks.append(Text(f"{dataset} ({backbone_key}), {subset} pair {pair_id} under every setting"))
            for pair in rows[rows["pair_id"] == pair_id].sort_values("matcher").to_dict("records"):
                stem = f"subset-{slug(dataset)}-{slug(backbone_key)}-{subset}-{slug(pair['matcher'])}"
                key = (dataset, pair["setting"], pair_id)
                blocks += pair_pictures(folder, run_folder, images, pair, points[key], stem)
    return blocks


def match_pictures(
    catalog: Catalog,
    folder: Path,
    run_folder: Path,
    keypoints: pd.DataFrame,
    at_alpha: pd.DataFrame,
    references: dict[tuple[str, str, str], str],
) -> list[Block]:
    """Pictures of the best, median and worst pairs of every dataset and backbone of the run, drawn into
    ``folder``; ``at_alpha`` is :func:`tables.pck_at` at ``REPORT_ALPHA``, ``references`` as
    :func:`tables.reference_settings` returns. A dataset whose images are absent gets a note instead."""
    blocks: list[Block] = []
    rows = {(row["dataset"], row["setting"], row["pair_id"]): row for row in at_alpha.to_dict("records")}
    points = dict(tuple(keypoints.groupby(["dataset", "setting", "pair_id"], observed=True)))
    for dataset, backbone_key in sorted({(dataset, backbone_key) for dataset, backbone_key, _ in references}):
        shown = [references[key] for m in tables.REFERENCE_METHODS if (key := (dataset, backbone_key, m)) in references]
        if not shown:
            continue
        try:
            images = DatasetImages(catalog, dataset)
        except FileNotFoundError as error:
            blocks.append(Text(f"{dataset}: no match pictures, the normalised images are not here ({error.filename})."))
            continue
        ranked = tables.ranked_pairs(at_alpha[at_alpha["dataset"] == dataset], shown[0])
        for number, (ranks, chosen) in enumerate(tables.best_median_worst(ranked)):
            pair_id = chosen["pair_id"]
            blocks.append(Text(f"{dataset} ({backbone_key}), {ranks} by {chosen['matcher']}: {pair_id}"))
            for matcher in shown:
                pair = rows.get((dataset, matcher, pair_id))
                if pair is None:  # this setting did not score the pair
                    continue
                stem = f"pair-{slug(dataset)}-{slug(backbone_key)}-{number}-{slug(pair['matcher'])}"
                blocks += pair_pictures(folder, run_folder, images, pair, points[(dataset, matcher, pair_id)], stem)
    return blocks
