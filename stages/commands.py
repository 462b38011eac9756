"""The commands the stages add to ``pipeline`` (list, report, export-tss, score-tss, match-pair) and the hooks of
``pipeline run``: the matcher check before it starts and the lines it prints after the match and report stages.

Each command imports its stage's modules only when it is called, so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click

from pipeline.catalog import Catalog, load_catalog
from pipeline.context import RunOptions
from stages.listing import SECTIONS, listing
from stages.matcher_params import check_matchers, select_sweeps


def check_matchers_and_sweeps(catalog: Catalog, options: RunOptions) -> None:
    """Before any stage starts: every catalog matcher's parameters, and the ``--matcher``/``--set`` selection."""
    check_matchers(catalog)
    select_sweeps(catalog, options.matchers, options.overrides)


def match_summary(catalog: Catalog, run_name: str) -> str:
    """What ``pipeline run`` prints after the match stage: the run's summary table."""
    from pipeline import results

    return (results.run_dir(catalog.stores.outputs, run_name) / "summary.md").read_text()


def report_index(catalog: Catalog, run_name: str) -> str:
    """What ``pipeline run`` prints after the report stage: where its index page is."""
    from pipeline import results
    from stages.report.status import report_dir

    return f"report: {report_dir(results.run_dir(catalog.stores.outputs, run_name)) / 'index.html'}"


@click.command("list")
@click.argument("sections", nargs=-1, type=click.Choice(SECTIONS))
@click.pass_context
def list_command(ctx: click.Context, sections: tuple[str, ...]) -> None:
    """List the catalog's datasets, backbones, matchers (parameters and defaults) and the runs in <outputs>."""
    for line in listing(load_catalog(ctx.obj["catalog_path"]), sections):
        click.echo(line)


@click.command("report")
@click.option(
    "--run", "run_name", default="default", show_default=True, metavar="NAME", help="The run: <outputs>/NAME."
)
@click.pass_context
def report_command(ctx: click.Context, run_name: str) -> None:
    """Build the report of an existing run: tables, plots and match pictures in <outputs>/NAME/report/."""
    from stages.report.stage import build_report  # imports matplotlib: only when needed

    click.echo(f"report: {build_report(load_catalog(ctx.obj['catalog_path']), run_name).index}")


@click.command("export-tss")
@click.option("--run", "run_name", required=True, metavar="NAME", help="The run whose flows to export.")
@click.option("--matcher", required=True, metavar="NAME", help="A setting's label or key, or a matcher name.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--dataset", metavar="NAME", help="The TSS dataset, when the run matched several.")
@click.pass_context
def export_tss_command(ctx: click.Context, run_name: str, matcher: str, out: Path, dataset: str | None) -> None:
    """Write a setting's predicted TSS flows as OUT/<subset>/<pair>/flow1.flo, flow2.flo (the kit's layout)."""
    from stages.evaluate.tss_kit import export_tss

    count = export_tss(load_catalog(ctx.obj["catalog_path"]), run_name, matcher, out, dataset)
    click.echo(f"exported the flows of {count} pair(s) to {out}")


@click.command("score-tss")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--dataset-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The ground truth's TSS_CVPR2016 folder (default: the catalog's tss raw folder).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write every row to this CSV.")
@click.option("-v", "--verbose", "all_rows", is_flag=True, help="Print every direction's row and T1..T50.")
@click.pass_context
def score_tss_command(
    ctx: click.Context, results_dir: Path, dataset_dir: Path | None, out: Path | None, all_rows: bool
) -> None:
    """Score flows in the TSS kit's layout (RESULTS_DIR/<subset>/<pair>/flowN.flo) as the official kit does."""
    from stages.evaluate.tss_kit import default_tss_dir, score_tss_folders

    dataset_dir = dataset_dir or default_tss_dir(load_catalog(ctx.obj["catalog_path"]))
    rows = [
        {"Subset": subset, **row}
        for subset, scores in score_tss_folders(results_dir, dataset_dir).items()
        for row in scores.rows()
    ]
    if out is not None:
        with out.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    thresholds = [f"T{t}" for t in range(1, 51)] if all_rows else ["T5"]
    shown = rows if all_rows else [row for row in rows if row["Row"] in ("Average", "w/o flip")]
    click.echo(" ".join([f"{'subset':<8} {'row':<24} {'flip':>4}", *(f"{t:>8}" for t in thresholds)]))
    for row in shown:
        values = (f"{row[t]:8.6f}" for t in thresholds)
        click.echo(" ".join([f"{row['Subset']:<8} {row['Row']:<24} {row['Flip']:>4}", *values]))


@click.command("match-pair")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("trg", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--points",
    "points",
    multiple=True,
    metavar="X,Y [X,Y ...]",
    help='Source pixels to transfer, e.g. --points "120,64 30,40" (default: an 8 x 8 grid).',
)
@click.option("--backbone", metavar="NAME", help="A catalog backbone (default: default_backbone).")
@click.option("--matcher", "matchers", multiple=True, metavar="NAME", help="Catalog matcher(s); default: nn, gwot.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default: <outputs>/match-pair)."
)
@click.pass_context
def match_pair_command(
    ctx: click.Context,
    src: Path,
    trg: Path,
    points: tuple[str, ...],
    backbone: str | None,
    matchers: tuple[str, ...],
    out: Path | None,
) -> None:
    """Match your own image pair SRC -> TRG; write one picture per matcher and a JSON of the points."""
    from stages.features.stage import check_backbone, resolve_backbone

    catalog = load_catalog(ctx.obj["catalog_path"])
    check_matchers(catalog)
    spec = resolve_backbone(catalog, backbone)
    check_backbone(spec)  # weights that cannot be loaded: one line, before torch and timm are imported
    from stages.match_pair import DEFAULT_MATCHERS, match_pair, parse_points

    result = match_pair(
        src,
        trg,
        backbone=spec,
        matchers=[catalog.matcher(name) for name in matchers or DEFAULT_MATCHERS],
        points=parse_points(points),
        out_dir=out or Path(catalog.stores.outputs) / "match-pair",
    )
    for name, picture in result.pictures.items():
        click.echo(f"{name}: {picture}")
    click.echo(f"points and predictions: {result.json_path}")
