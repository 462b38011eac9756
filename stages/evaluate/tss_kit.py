"""The TSS kit's commands on a run: a setting's predicted flows exported in the kit's folder layout
(``pipeline export-tss``), and folders in that layout scored against the ground truth (``pipeline score-tss``).

The scoring itself is :mod:`stages.evaluate.tss`; this module finds the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import results
from pipeline.catalog import Catalog
from pipeline.errors import CatalogError, StageError
from stages.datasets.tss import ROOT as TSS_ROOT
from stages.datasets.tss import SUBSETS as TSS_SUBSETS
from stages.evaluate.tss import TssScores, score_tss_results


def _setting_key(config: dict[str, Any], matcher: str, run: str) -> str:
    """The key of the run's setting named ``matcher`` (a key, a label, or a matcher with one setting)."""
    settings = config.get("settings", {})
    exact = [key for key, s in settings.items() if matcher in (key, s["label"])]
    named = [key for key, s in settings.items() if s["name"] == matcher]
    found = exact or named
    if len(found) != 1:
        listing = ", ".join(f"{s['label']} ({key})" for key, s in sorted(settings.items())) or "none"
        problem = "matches several settings" if found else "is not a setting of the run"
        raise StageError(f"--matcher {matcher!r} {problem} {run!r}; pass a label or key of: {listing}")
    return found[0]


def export_tss(catalog: Catalog, run: str, matcher: str, out: str | Path, dataset: str | None = None) -> int:
    """Copy a setting's predicted TSS flows into ``out/<subset>/<pair>/flow1.flo, flow2.flo`` (the kit's
    layout); returns the number of pairs. ``matcher`` is a setting's label or key, or a matcher name that
    has one setting in the run; ``dataset`` is needed only when several datasets of the run have flows."""
    run_folder = results.run_dir(catalog.stores.outputs, run)
    config = results.read_run_config(run_folder)
    if not config:
        raise StageError(f"no run {run!r} in {run_folder}; run `pipeline run --stage match --run {run}` first")
    results.check_layout(run_folder)
    key = _setting_key(config, matcher, run)
    label = config["settings"][key]["label"]
    with_flows = [d for d in config.get("datasets", {}) if results.flows_dir(run_folder, d, label, key).is_dir()]
    if dataset is None and len(with_flows) != 1:
        raise StageError(
            f"run {run!r} has TSS flows of {label} ({key}) for datasets {with_flows}; pass --dataset NAME"
            if with_flows
            else f"run {run!r} has no TSS flows for setting {label} ({key}); match a TSS dataset with it first"
        )
    source = results.flows_dir(run_folder, dataset or with_flows[0], label, key)
    pair_dirs = sorted(p for p in source.glob("*/*") if p.is_dir())
    incomplete = [
        f"{p.parent.name}/{p.name}" for p in pair_dirs if not all((p / f"flow{n}.flo").is_file() for n in (1, 2))
    ]
    if incomplete or not pair_dirs:
        raise StageError(f"{source}: pairs lacking flow1.flo or flow2.flo: {incomplete or 'all'}; finish the match run")
    for pair_dir in pair_dirs:
        target = Path(out) / pair_dir.parent.name / pair_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for n in (1, 2):
            shutil.copyfile(pair_dir / f"flow{n}.flo", target / f"flow{n}.flo")
    return len(pair_dirs)


def default_tss_dir(catalog: Catalog) -> Path:
    """``<data_root>/raw/<first tss dataset>/TSS_CVPR2016``: the ground truth ``score-tss`` uses by default."""
    names = [name for name, spec in catalog.datasets.items() if spec.kind == "tss"]
    if not names:
        raise CatalogError(f"{catalog.path}: no dataset of kind tss; pass --dataset-dir TSS_CVPR2016_FOLDER")
    return catalog.raw_dir(names[0]) / TSS_ROOT


def _grey_mask(path: Path) -> np.ndarray:
    """A mask as OpenCV's IMREAD_GRAYSCALE renders it: palette colours through their luma (matches the kit)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def score_tss_folders(results_dir: str | Path, dataset_dir: str | Path) -> dict[str, TssScores]:
    """Score predictions in the kit's layout against the ground truth, per subset.

    ``results_dir`` holds subset folders (``FG3DCar``, ``JODS``, ``PASCAL``) of pair folders, each scored
    against ``dataset_dir/<subset>``; or it is one subset's folder of pair folders, scored against
    ``dataset_dir/<its name>`` when that exists, else against ``dataset_dir`` itself. SegIUR is scored where
    predicted masks (``mask1.png``, ``mask2.png``) exist.
    """
    results_dir, dataset_dir = Path(results_dir), Path(dataset_dir)
    subsets = sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name in TSS_SUBSETS)
    if subsets:
        return {p.name: score_tss_results(p, dataset_dir / p.name, read_mask=_grey_mask) for p in subsets}
    ground_truth = dataset_dir / results_dir.name if (dataset_dir / results_dir.name).is_dir() else dataset_dir
    return {results_dir.name: score_tss_results(results_dir, ground_truth, read_mask=_grey_mask)}
