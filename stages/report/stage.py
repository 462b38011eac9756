"""The report stage: tables, plots and match pictures of a run, as ``<outputs>/<run>/report/index.html``.

Numbers come from the run's Parquet tables alone (:mod:`pipeline.results`, computed by :mod:`.tables`);
the match pictures (:mod:`.pictures`) also read the normalised images and the stored TSS flows. The report
covers every dataset and setting of the run. ``report/`` holds ``index.html``, ``report.md`` (the same
content) and the PNGs; it is rebuilt whole and swapped in atomically, so it never mixes two builds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from pipeline import results
from pipeline.cache import atomic_path
from pipeline.catalog import Catalog
from pipeline.context import StageContext
from pipeline.errors import StageError
from stages.evaluate.pck import THRESHOLD_KINDS
from stages.evaluate.summary import pck_long
from stages.matcher_params import parse_params
from stages.report import plots, tables
from stages.report.html import Alert, Block, Picture, Section, Table, Text, write_documents
from stages.report.paper import paper_section
from stages.report.pictures import match_pictures, percent, slug, subset_pictures
from stages.report.status import is_up_to_date, report_dir
from stages.report.status import status as status  # the stage's status (registered from there: no pandas)

log = logging.getLogger(__name__)

SHORT = {"per_image": "img", "per_keypoint": "kp", "all_directions": "all", "without_flip": "w/o flip"}
ALPHA = tables.REPORT_ALPHA


@dataclass(frozen=True)
class Report:
    """A built report: its two documents, the numbers behind its tables by name, and its PNG files."""

    index: Path
    markdown: Path
    tables: dict[str, pd.DataFrame]
    pictures: tuple[Path, ...]


def _backbone(frame: pd.DataFrame) -> pd.Series:
    """The backbone column as shown: random weights are marked on every row they touch."""
    return frame["backbone"] + frame["random_weights"].map({True: " (RANDOM weights)", False: ""})


def _pck_columns(table: pd.DataFrame, index: Sequence[str], difference: bool = False) -> pd.DataFrame:
    """One row per ``index`` group of a PCK table; columns ``PCK@alpha img`` and ``kp`` at each alpha, in
    % (with ``difference``: signed percentage points, headed ``Δ``)."""
    rows = []
    for keys, group in table.groupby(list(index), sort=True, observed=True):
        row = dict(zip(index, keys, strict=True))
        for r in group.sort_values("alpha").itertuples(index=False):
            for averaging in ("per_image", "per_keypoint"):
                value = getattr(r, averaging)
                name = f"{'Δ ' if difference else ''}PCK@{r.alpha:g} {SHORT[averaging]}"
                row[name] = f"{100 * value:+.1f}" if difference else percent(value)
        rows.append(row)
    return pd.DataFrame(rows)


def _by_setting(table: pd.DataFrame, index: Sequence[str]) -> pd.DataFrame:
    """One row per ``index`` group, one column per setting label holding ``img / kp`` PCK in %."""
    cells = [f"{percent(i)} / {percent(k)}" for i, k in zip(table["per_image"], table["per_keypoint"], strict=True)]
    wide = table.assign(cell=cells).pivot_table(index=list(index), columns="matcher", values="cell", aggfunc="first")
    return wide.fillna("-").reset_index().rename_axis(columns=None).rename(columns={"n_pairs": "pairs"})


def _run_section(run_name: str, run_folder: Path, pairs: pd.DataFrame) -> Section:
    datasets = ", ".join(sorted(pairs["dataset"].unique()))
    blocks: list[Block] = [
        Text(
            f"Run {run_name} ({run_folder}): datasets {datasets}; {pairs['matcher'].nunique()} matcher "
            f"setting(s); {len(pairs)} results (pair x setting). Built from the run's Parquet tables alone."
        )
    ]
    random = pairs.loc[pairs["random_weights"], ["backbone", "backbone_key"]].drop_duplicates()
    if not random.empty:
        stores = ", ".join(sorted(f"{b} ({k})" for b, k in random.itertuples(index=False)))
        blocks.insert(
            0,
            Alert(
                f"RANDOM WEIGHTS: the features of {stores} come from an untrained network (the pretrained "
                "weights were not available). Their numbers measure the pipeline, not the method."
            ),
        )
    return Section("Run", tuple(blocks))


def _headline_section(pairs: pd.DataFrame, headline: pd.DataFrame, difference: pd.DataFrame) -> Section:
    kinds = "; ".join(
        f"{kind} = {THRESHOLD_KINDS.get(kind, kind)}" for kind in sorted(pairs["threshold_kind"].unique())
    )
    protocol = Text(
        f"Protocol. A keypoint is correct at alpha when its error <= alpha x the reference length ({kinds}), "
        "all in original pixels of the target image. PCK per image (img) is the mean over pairs with "
        "keypoints of each pair's fraction correct; PCK per keypoint (kp) pools the correct keypoints of all "
        "pairs. Values in %. Split: test."
    )
    if headline.empty:
        return Section("Headline: PCK per image and per keypoint", (Text("No pair of the run has keypoints."),))
    index = ["dataset", "matcher", "backbone", "threshold_kind", "n_pairs", "n_keypoints"]
    table = _pck_columns(headline.assign(backbone=_backbone(headline)), index)
    names = {
        "threshold_kind": "threshold",
        "n_pairs": "pairs",
        "n_keypoints": "keypoints",
    }
    blocks: list[Block] = [
        protocol,
        Table(table.rename(columns=names), "PCK of every dataset and matcher setting"),
    ]
    if not difference.empty:
        delta = _pck_columns(difference, ["dataset", "backbone", "gwot_label", "nn_label"], difference=True)
        caption = "GWOT - NN: each GWOT setting minus the NN setting of its dataset and backbone (points)"
        blocks.append(Table(delta.rename(columns={"gwot_label": "GWOT", "nn_label": "NN"}), caption))
    return Section("Headline: PCK per image and per keypoint", tuple(blocks))


def _flow_section(flow: pd.DataFrame) -> Section:
    text = Text(
        "TSS kit protocol: the share of ground-truth pixels whose predicted flow is within T% of the target "
        "image's larger side, in original pixels, averaged over directions (w/o flip: only pairs with "
        "flip_gt = 0). T5 is the kit's headline number. Values in %."
    )
    index = ["dataset", "subset", "matcher", "backbone", "averaging", "n_pairs"]
    columns = [f"T{t}" for t in tables.FLOW_THRESHOLDS]
    shown = flow.assign(backbone=_backbone(flow), averaging=flow["averaging"].map(SHORT))
    table = shown[[*index, *columns]].sort_values(index[:5], ignore_index=True)
    table[columns] = table[columns].map(percent)
    table = table.rename(columns={"n_pairs": "directions"})
    return Section("Dense flow accuracy (TSS kit protocol)", (text, Table(table, "Flow accuracy per subset")))


def _curve_pictures(folder: Path, curves: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    for dataset, rows in curves.groupby("dataset", sort=True):
        file = f"pck-curve-{slug(dataset)}.png"
        plots.plot_pck_curves(rows, title=f"{dataset}: PCK against alpha", marker_alpha=ALPHA, path=folder / file)
        blocks.append(Picture(file, f"{dataset}: PCK per keypoint against alpha (0 to 0.2), every setting"))
    return blocks


def _error_pictures(folder: Path, at_alpha: pd.DataFrame, references: dict[tuple[str, str, str], str]) -> list[Block]:
    """Per dataset, overlaid histograms of every pair's ``1 - PCK@ALPHA`` under each reference setting."""
    blocks: list[Block] = []
    for dataset, rows in at_alpha.groupby("dataset", sort=True):
        several = rows["backbone_key"].nunique() > 1
        errors = {}
        for (d, backbone_key, _), key in sorted(references.items()):
            setting = rows[rows["setting"] == key]
            if d == dataset and not setting.empty:
                name = setting["matcher"].iloc[0] + (f" ({backbone_key})" if several else "")
                errors[name] = 1 - setting["pck"].to_numpy()
        file = f"pair-error-{slug(dataset)}.png"
        title = f"{dataset}: per-pair error, {' against '.join(errors)}"
        plots.plot_error_histograms(errors, title=title, xlabel=f"1 - PCK@{ALPHA:g} of a pair", path=folder / file)
        blocks.append(Picture(file, f"{dataset}: distribution over pairs of 1 - PCK@{ALPHA:g} (per image)"))
    return blocks


def _scatter_pictures(folder: Path, at_alpha: pd.DataFrame, references: dict[tuple[str, str, str], str]) -> list[Block]:
    """Per dataset and backbone with both methods: each pair's PCK@ALPHA under the reference NN setting
    against the reference GWOT setting."""
    blocks: list[Block] = []
    for (dataset, backbone_key, method), nn_key in sorted(references.items()):
        gwot_key = references.get((dataset, backbone_key, "gwot"))
        if method != "nn" or gwot_key is None:
            continue
        rows = at_alpha[at_alpha["dataset"] == dataset]
        both = rows[rows["setting"] == nn_key].merge(
            rows[rows["setting"] == gwot_key], on="pair_id", suffixes=("_nn", "_gwot"), validate="1:1"
        )
        if both.empty:
            continue
        nn_label, gwot_label = both["matcher_nn"].iloc[0], both["matcher_gwot"].iloc[0]
        file = f"scatter-{slug(dataset)}-{slug(backbone_key)}.png"
        title = f"{dataset}: PCK@{ALPHA:g} of each pair, {nn_label} against {gwot_label}"
        plots.plot_pair_scatter(
            both["pck_nn"], both["pck_gwot"], x_label=nn_label, y_label=gwot_label, title=title, path=folder / file
        )
        caption = f"{dataset} ({backbone_key}): each pair's PCK@{ALPHA:g}; above the diagonal, {gwot_label} is better"
        blocks.append(Picture(file, caption))
    return blocks


def _bars(folder: Path, rows: pd.DataFrame, group: str, file: str, title: str) -> str:
    """Draw per-image PCK@ALPHA of every setting per ``group`` value into ``folder/file``; returns ``file``."""
    plots.plot_grouped_bars(
        rows, group=group, value="per_image", title=title, ylabel=f"PCK@{ALPHA:g} per image (%)", path=folder / file
    )
    return file


def _category_blocks(folder: Path, categories: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    for dataset, rows in categories.groupby("dataset", sort=True):
        file = _bars(
            folder, rows, "category", f"categories-{slug(dataset)}.png", f"{dataset}: PCK@{ALPHA:g} per category"
        )
        blocks += [
            Table(
                _by_setting(rows, ["category", "n_pairs"]),
                f"{dataset}: PCK@{ALPHA:g} per category, img / kp (%)",
            ),
            Picture(file, f"{dataset}: PCK@{ALPHA:g} per image, per category"),
        ]
    return blocks


def _subset_blocks(folder: Path, subsets: pd.DataFrame) -> list[Block]:
    """Per dataset with more than normal pairs: PCK per subset (normal, mirrored, smaller, larger) with every
    setting side by side, a bar picture, and what the flip/scale-aware settings decided per subset."""
    blocks: list[Block] = []
    for dataset, rows in subsets.groupby("dataset", sort=True):
        if set(rows["subset"]) == {"normal"}:
            continue
        file = _bars(folder, rows, "subset", f"subsets-{slug(dataset)}.png", f"{dataset}: PCK@{ALPHA:g} per subset")
        table = _by_setting(rows, ["subset", "n_pairs"])
        order = {name: index for index, name in enumerate(tables.SUBSETS)}
        table = table.sort_values("subset", key=lambda c: c.map(order), ignore_index=True)
        blocks += [
            Table(
                table,
                f"{dataset}: PCK@{ALPHA:g} per subset (mirrored target; target object ~0.5x: smaller, "
                "~2x: larger), img / kp (%)",
            ),
            Picture(file, f"{dataset}: PCK@{ALPHA:g} per image, per subset"),
        ]
        decided = rows[rows["mirrored_kept"].notna()]
        if not decided.empty:
            shown = decided[["subset", "matcher", "n_pairs", "mirrored_kept", "median_scale"]].rename(
                columns={
                    "n_pairs": "pairs",
                    "mirrored_kept": "mirrored kept (%)",
                    "median_scale": "median scale estimate",
                }
            )
            shown["mirrored kept (%)"] = shown["mirrored kept (%)"].map(percent)
            shown["median scale estimate"] = shown["median scale estimate"].map(
                lambda value: "-" if pd.isna(value) else f"{value:.2f}"
            )
            blocks.append(
                Table(
                    shown,
                    f"{dataset}: per subset, the share of pairs GWOT solved with the source mirrored, "
                    "and the median estimated relative scale (target / source)",
                )
            )
    return blocks


def _difficulty_blocks(difficulty: dict[str, pd.DataFrame]) -> list[Block]:
    return [
        Table(_by_setting(rows, [column, "n_pairs"]), f"{dataset}: PCK@{ALPHA:g} by {column}, img / kp (%)")
        for column, table in difficulty.items()
        for dataset, rows in table.groupby("dataset", sort=True)
    ]


def _sweep_blocks(folder: Path, sweeps: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    if sweeps.empty:
        return blocks
    for (dataset, backbone_key, method), sweep in sweeps.groupby(["dataset", "backbone_key", "method"], sort=True):
        swept = tables.swept_parameters(sweep)
        shown = sweep[["matcher", *swept, "n_pairs"]].rename(columns={"n_pairs": "pairs"})
        for averaging in ("per_image", "per_keypoint"):
            shown[f"PCK@{ALPHA:g} {SHORT[averaging]}"] = sweep[averaging].map(percent)
        blocks.append(Table(shown, f"{dataset}: settings of {method} on {backbone_key}, PCK@{ALPHA:g} (%)"))
        if len(swept) == 2:
            blocks.append(_sweep_heatmap(folder, sweep, swept, dataset, backbone_key, method))
            continue
        for parameter in swept:
            file = f"sweep-{slug(dataset)}-{slug(backbone_key)}-{method}-{slug(parameter)}.png"
            others = [other for other in swept if other != parameter]
            title = f"{dataset}: {method} PCK@{ALPHA:g} against {parameter}"
            plots.plot_sweep(sweep, parameter, others, title=title, path=folder / file)
            blocks.append(Picture(file, f"{dataset}: PCK@{ALPHA:g} of {method} against {parameter}"))
    return blocks


def _sweep_heatmap(
    folder: Path, sweep: pd.DataFrame, swept: Sequence[str], dataset: str, backbone_key: str, method: str
) -> Picture:
    """A 2-D sweep's PCK@ALPHA per image over its two parameters, as one heatmap."""
    file = f"sweep-{slug(dataset)}-{slug(backbone_key)}-{method}-heatmap.png"
    title = f"{dataset}: {method} PCK@{ALPHA:g} per image against {swept[0]} and {swept[1]}"
    plots.plot_sweep_heatmap(sweep, swept[0], swept[1], "per_image", title=title, path=folder / file)
    return Picture(file, f"{dataset}: PCK@{ALPHA:g} per image (%) of every {swept[0]} x {swept[1]} setting of {method}")


def _settings_section(pairs: pd.DataFrame) -> Section:
    keys = ["dataset", "matcher", "setting", "method", "backbone", "backbone_key", "random_weights"]
    table = (
        pairs.groupby([*keys, "params_json"], sort=True, observed=True)
        .agg(pairs=("pair_id", "size"), seconds=("solve_seconds", "mean"))
        .reset_index()
    )
    table["seconds"] = table["seconds"].map(lambda seconds: f"{seconds:.3g}")
    names = {
        "params_json": "parameters",
        "seconds": "solve s/pair",
    }
    text = Text("Every setting of the run, with its parameters and mean solve time per pair.")
    return Section("Settings", (text, Table(table.rename(columns=names))))


def catalog_defaults(catalog: Catalog) -> dict[str, str]:
    """Matcher name -> the ``params_json`` of the catalog's own setting of it (for reference settings)."""
    return {name: json.dumps(asdict(parse_params(spec)), sort_keys=True) for name, spec in catalog.matchers.items()}


def report_numbers(run: tables.RunResults, defaults: Mapping[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report as numbers (fractions), by name: ``headline``, ``gwot_minus_nn``,
    ``pair_pck`` (per pair at ``REPORT_ALPHA``), ``categories``, ``subsets`` (normal / mirrored / smaller /
    larger, with the flip/scale decisions), ``by_<difficulty column>``, ``flow``, ``curves`` and ``sweeps``
    (the sweep tables, concatenated). ``defaults``: see :func:`catalog_defaults`."""
    references = tables.reference_settings(run.pairs, defaults)
    headline = tables.pck_table(pck_long(tables.scored_pairs(run.pairs)))
    at_alpha = tables.pck_at(run.pairs, run.keypoints, ALPHA)
    sweeps = tables.sweep_tables(tables.pck_table(at_alpha))
    return {
        "headline": headline,
        "gwot_minus_nn": tables.gwot_minus_nn(headline, references),
        "pair_pck": at_alpha,
        "categories": tables.pck_table(at_alpha, ["category"]),
        "subsets": tables.subset_table(at_alpha),
        **{f"by_{column}": table for column, table in tables.difficulty_tables(at_alpha).items()},
        "flow": tables.flow_accuracy_table(run.pairs),
        "curves": tables.pck_curves(run.pairs, run.keypoints),
        "sweeps": pd.concat(sweeps.values(), ignore_index=True) if sweeps else pd.DataFrame(),
    }


def _compose(
    catalog: Catalog, run_name: str, run_folder: Path, run: tables.RunResults, folder: Path
) -> tuple[list[Section], dict[str, pd.DataFrame]]:
    """Draw every picture into ``folder``; returns the report's sections and the numbers behind them."""
    defaults = catalog_defaults(catalog)
    numbers = report_numbers(run, defaults)
    references = tables.reference_settings(run.pairs, defaults)
    at_alpha = numbers["pair_pck"]
    difficulty = {name.removeprefix("by_"): table for name, table in numbers.items() if name.startswith("by_")}
    sections = [
        _run_section(run_name, run_folder, run.pairs),
        _headline_section(run.pairs, numbers["headline"], numbers["gwot_minus_nn"]),
    ]
    kinds = {name: spec.kind for name, spec in catalog.datasets.items()}
    paper, paper_tables = paper_section(folder, run.pairs, run.keypoints, kinds)
    numbers.update(paper_tables)
    sections += [paper] if paper is not None else []
    if not numbers["flow"].empty:
        sections.append(_flow_section(numbers["flow"]))
    optional = [
        ("PCK against alpha", _curve_pictures(folder, numbers["curves"])),
        ("Per-pair error: NN against GWOT", _error_pictures(folder, at_alpha, references)),
        (f"Per pair: NN against GWOT (PCK@{ALPHA:g})", _scatter_pictures(folder, at_alpha, references)),
        (f"Per category (PCK@{ALPHA:g})", _category_blocks(folder, numbers["categories"])),
        (f"Per subset: mirrored and rescaled pairs (PCK@{ALPHA:g})", _subset_blocks(folder, numbers["subsets"])),
        ("By difficulty (SPair-71k annotations)", _difficulty_blocks(difficulty)),
        ("Sweeps", _sweep_blocks(folder, numbers["sweeps"])),
        (
            "Mirrored and rescaled pairs under every setting",
            subset_pictures(catalog, folder, run_folder, run.keypoints, at_alpha),
        ),
        (
            f"Match pictures (best, median, worst by PCK@{ALPHA:g})",
            match_pictures(catalog, folder, run_folder, run.keypoints, at_alpha, references),
        ),
    ]
    sections += [Section(title, tuple(blocks)) for title, blocks in optional if blocks]
    sections.append(_settings_section(run.pairs))
    return sections, numbers


def build_report(catalog: Catalog, run_name: str) -> Report:
    """Build the report of run ``run_name`` under the catalog's outputs; StageError when it has no results."""
    run_folder = results.run_dir(catalog.stores.outputs, run_name)
    run = tables.load_run(run_folder)
    if run.pairs.empty:
        raise StageError(
            f"run {run_name!r} has no results in {run_folder}; run `pipeline run --stage match --run {run_name}` first"
        )
    final = report_dir(run_folder)
    with atomic_path(final) as folder:
        folder.mkdir()
        sections, numbers = _compose(catalog, run_name, run_folder, run, folder)
        write_documents(folder, f"Report of run {run_name}", sections)
        files = sorted(path.name for path in folder.glob("*.png"))
    return Report(final / "index.html", final / "report.md", numbers, tuple(final / name for name in files))


def run(ctx: StageContext) -> Path:
    """Build the report of run ``ctx.options.run_name`` (all its datasets) unless it is up to date (or with
    ``--force``); returns its ``index.html``."""
    run_folder = results.run_dir(ctx.catalog.stores.outputs, ctx.options.run_name)
    if not ctx.options.force and is_up_to_date(run_folder):
        log.info("report of run %r is up to date: %s", ctx.options.run_name, report_dir(run_folder) / "index.html")
        return report_dir(run_folder) / "index.html"
    report = build_report(ctx.catalog, ctx.options.run_name)
    log.info("report of run %r: %s", ctx.options.run_name, report.index)
    return report.index
