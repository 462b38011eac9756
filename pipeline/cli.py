"""The ``pipeline`` command line: run stages, show their status, build reports, export and score TSS flows."""

from __future__ import annotations

import csv
import dataclasses
import logging
import sys
from collections import defaultdict
from pathlib import Path

import click

from pipeline import damage
from pipeline.catalog import DEFAULT_CATALOG, load_catalog
from pipeline.context import RunOptions
from pipeline.errors import PipelineError
from pipeline.runner import STAGE_ORDER, run_stages, status_table
from stages.matcher_params import check_matchers, select_sweeps


class _ReportErrors(click.Group):
    """Print a PipelineError as one clear line and exit with status 1, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_ReportErrors)
@click.option(
    "--catalog",
    "catalog_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CATALOG,
    show_default=True,
    help="The data catalog to use.",
)
@click.option("-v", "--verbose", count=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, catalog_path: Path, verbose: int, quiet: bool) -> None:
    """Zero-shot semantic correspondence: download, normalise, extract features, match, evaluate, report.

    Store roots can be overridden with PIPELINE_DATA_ROOT, PIPELINE_CACHE_ROOT and PIPELINE_OUTPUTS.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    ctx.obj = {"catalog_path": catalog_path, "quiet": quiet}


@cli.command()
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice(STAGE_ORDER),
    help="Stage(s) to run; without it, all stages in order.",
)
@click.option("--dataset", "datasets", multiple=True, help="Dataset(s) from the catalog; without it, all.")
@click.option("--force", is_flag=True, help="Recompute work that is already done.")
@click.option("--skip-bad", is_flag=True, help="normalize: record malformed items in a report instead of stopping.")
@click.option(
    "--verify",
    is_flag=True,
    help="Also read every stored feature chunk back; list every damaged record found and set aside.",
)
@click.option(
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="download: a file fetched by hand (matched to a source of the selected dataset by its name).",
)
@click.option("--backbone", metavar="NAME", help="features: a catalog backbone (default: default_backbone).")
@click.option("--scheduler", metavar="ADDRESS", help="A running Dask scheduler, instead of the catalog's.")
@click.option(
    "--matcher", "matchers", multiple=True, metavar="NAME", help="match: catalog matcher(s); without it, all."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="MATCHER.KEY=V1,V2",
    help="match: try each value of a matcher parameter; several --set span their grid.",
)
@click.option(
    "--run",
    "run_name",
    default="default",
    show_default=True,
    metavar="NAME",
    help="match, report: results go to <outputs>/NAME.",
)
@click.option(
    "--category",
    "categories",
    multiple=True,
    metavar="NAME",
    help="match: only the test pairs of this category (SPair class, TSS subset, ...); repeatable.",
)
@click.option(
    "--max-pairs",
    type=click.IntRange(min=1),
    metavar="N",
    help="match: at most N test pairs per dataset, a fixed sample (for a quick try; use its own --run).",
)
@click.pass_context
def run(
    ctx: click.Context,
    stages: tuple[str, ...],
    datasets: tuple[str, ...],
    force: bool,
    skip_bad: bool,
    verify: bool,
    archives: tuple[Path, ...],
    backbone: str | None,
    scheduler: str | None,
    matchers: tuple[str, ...],
    overrides: tuple[str, ...],
    run_name: str,
    categories: tuple[str, ...],
    max_pairs: int | None,
) -> None:
    """Run pipeline stages; only missing work is done unless --force."""
    catalog = load_catalog(ctx.obj["catalog_path"])
    check_matchers(catalog)  # before any stage starts: bad values named where they came from
    select_sweeps(catalog, matchers, overrides)
    if not run_name or Path(run_name).name != run_name or run_name.startswith("."):
        raise click.UsageError(f"--run {run_name!r}: expected a plain folder name (no '/', not starting with '.')")
    if archives and len(datasets) != 1:
        raise click.UsageError("--archive needs exactly one --dataset to match the file to")
    by_dataset: dict[str, tuple[Path, ...]] = defaultdict(tuple)
    if archives:
        by_dataset[datasets[0]] = tuple(p.resolve() for p in archives)
    options = RunOptions(
        force=force,
        skip_bad=skip_bad,
        verify=verify,
        archives=dict(by_dataset),
        progress=not ctx.obj["quiet"],
        scheduler=scheduler,
        backbone=backbone,
        matchers=matchers,
        overrides=overrides,
        run_name=run_name,
        categories=categories,
        max_pairs=max_pairs,
    )
    with damage.collecting() as found:
        try:
            run_stages(catalog, stages, datasets, options)
        finally:
            if verify:
                _echo_damage(found, "verify: every record read back intact")
    from pipeline import results  # imports pandas: only after a run

    if "match" in (stages or STAGE_ORDER):
        click.echo((results.run_dir(catalog.stores.outputs, run_name) / "summary.md").read_text())
    if "report" in (stages or STAGE_ORDER):
        from stages.report.stage import report_dir  # the stage ran: its imports are loaded already

        click.echo(f"report: {report_dir(results.run_dir(catalog.stores.outputs, run_name)) / 'index.html'}")


@cli.command()
@click.option("--dataset", "datasets", multiple=True, help="Dataset(s) from the catalog; without it, all.")
@click.option("--backbone", metavar="NAME", help="features, match: a catalog backbone (default: default_backbone).")
@click.option("--run", "run_name", default="default", show_default=True, help="match, report: the run folder.")
@click.pass_context
def status(ctx: click.Context, datasets: tuple[str, ...], backbone: str | None, run_name: str) -> None:
    """Show, per dataset and stage, what is done and what is missing."""
    catalog = load_catalog(ctx.obj["catalog_path"])
    with damage.collecting(repair=False) as found:
        rows = status_table(catalog, datasets, RunOptions(backbone=backbone, run_name=run_name))
    click.echo(f"{'dataset':<14} {'stage':<10} {'state':<9} {'done':>11}  detail")
    for dataset, stage, st in rows:
        state = "done" if st.complete else ("partial" if st.done else "missing")
        count = f"{st.done}/{st.total if st.total is not None else '?'}"
        click.echo(f"{dataset:<14} {stage:<10} {state:<9} {count:>11}  {st.detail}")
    if found:
        _echo_damage(found, "")


def _echo_damage(found: list[damage.Damage], when_none: str) -> None:
    """List damaged records, one line each (or print ``when_none``)."""
    if found:
        click.echo(f"damaged: {len(found)} record(s):")
        for record in found:
            click.echo(f"  {record.line()}")
    elif when_none:
        click.echo(when_none)


@cli.command("list")
@click.argument("sections", nargs=-1, type=click.Choice(["datasets", "backbones", "matchers", "runs"]))
@click.pass_context
def list_command(ctx: click.Context, sections: tuple[str, ...]) -> None:
    """List the catalog's datasets, backbones, matchers (parameters and defaults) and the runs in <outputs>."""
    from pipeline.listing import listing

    def matcher_params(spec):  # the parameter classes live in stages/: imported only for this section
        from stages.matcher_params import PARAMS, parse_params

        return dataclasses.asdict(parse_params(spec)), dataclasses.asdict(PARAMS[spec.method]())

    for line in listing(load_catalog(ctx.obj["catalog_path"]), matcher_params, sections):
        click.echo(line)


@cli.command()
@click.option(
    "--run", "run_name", default="default", show_default=True, metavar="NAME", help="The run: <outputs>/NAME."
)
@click.pass_context
def report(ctx: click.Context, run_name: str) -> None:
    """Build the report of an existing run: tables, plots and match pictures in <outputs>/NAME/report/."""
    from stages.report.stage import build_report  # imports matplotlib: only when needed

    click.echo(f"report: {build_report(load_catalog(ctx.obj['catalog_path']), run_name).index}")


@cli.command("export-tss")
@click.option("--run", "run_name", required=True, metavar="NAME", help="The run whose flows to export.")
@click.option("--matcher", required=True, metavar="NAME", help="A setting's label or key, or a matcher name.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--dataset", metavar="NAME", help="The TSS dataset, when the run matched several.")
@click.pass_context
def export_tss(ctx: click.Context, run_name: str, matcher: str, out: Path, dataset: str | None) -> None:
    """Write a setting's predicted TSS flows as OUT/<subset>/<pair>/flow1.flo, flow2.flo (the kit's layout)."""
    from stages.match.stage import export_tss as export  # imports torch: only when needed

    count = export(load_catalog(ctx.obj["catalog_path"]), run_name, matcher, out, dataset)
    click.echo(f"exported the flows of {count} pair(s) to {out}")


@cli.command("score-tss")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--dataset-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The ground truth's TSS_CVPR2016 folder (default: the catalog's tss raw folder).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write every row to this CSV.")
@click.option("-v", "--verbose", "all_rows", is_flag=True, help="Print every direction's row and T1..T50.")
@click.pass_context
def score_tss(
    ctx: click.Context, results_dir: Path, dataset_dir: Path | None, out: Path | None, all_rows: bool
) -> None:
    """Score flows in the TSS kit's layout (RESULTS_DIR/<subset>/<pair>/flowN.flo) as the official kit does."""
    from stages.match.stage import default_tss_dir, score_tss_folders  # imports torch: only when needed

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


@cli.command("match-pair")
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
    from stages.features.stage import resolve_backbone  # imports torch and timm: only when needed
    from stages.report.match_pair import DEFAULT_MATCHERS, match_pair, parse_points

    catalog = load_catalog(ctx.obj["catalog_path"])
    check_matchers(catalog)
    result = match_pair(
        src,
        trg,
        backbone=resolve_backbone(catalog, backbone),
        matchers=[catalog.matcher(name) for name in matchers or DEFAULT_MATCHERS],
        points=parse_points(points),
        out_dir=out or Path(catalog.stores.outputs) / "match-pair",
    )
    for name, picture in result.pictures.items():
        click.echo(f"{name}: {picture}")
    click.echo(f"points and predictions: {result.json_path}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pipeline")
