"""The ``pipeline`` command line: run stages, show their status."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import click

from pipeline.catalog import DEFAULT_CATALOG, load_catalog
from pipeline.context import RunOptions
from pipeline.errors import PipelineError
from pipeline.runner import STAGE_ORDER, run_stages, status_table


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
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="download: a file fetched by hand (matched to a source of the selected dataset by its name).",
)
@click.option("--backbone", metavar="NAME", help="features: a catalog backbone (default: default_backbone).")
@click.option("--scheduler", metavar="ADDRESS", help="A running Dask scheduler, instead of the catalog's.")
@click.pass_context
def run(
    ctx: click.Context,
    stages: tuple[str, ...],
    datasets: tuple[str, ...],
    force: bool,
    skip_bad: bool,
    archives: tuple[Path, ...],
    backbone: str | None,
    scheduler: str | None,
) -> None:
    """Run pipeline stages; only missing work is done unless --force."""
    catalog = load_catalog(ctx.obj["catalog_path"])
    if archives and len(datasets) != 1:
        raise click.UsageError("--archive needs exactly one --dataset to match the file to")
    by_dataset: dict[str, tuple[Path, ...]] = defaultdict(tuple)
    if archives:
        by_dataset[datasets[0]] = tuple(p.resolve() for p in archives)
    options = RunOptions(
        force=force,
        skip_bad=skip_bad,
        archives=dict(by_dataset),
        progress=not ctx.obj["quiet"],
        scheduler=scheduler,
        backbone=backbone,
    )
    run_stages(catalog, stages, datasets, options)


@cli.command()
@click.option("--dataset", "datasets", multiple=True, help="Dataset(s) from the catalog; without it, all.")
@click.pass_context
def status(ctx: click.Context, datasets: tuple[str, ...]) -> None:
    """Show, per dataset and stage, what is done and what is missing."""
    catalog = load_catalog(ctx.obj["catalog_path"])
    rows = status_table(catalog, datasets)
    click.echo(f"{'dataset':<14} {'stage':<10} {'state':<9} {'done':>11}  detail")
    for dataset, stage, st in rows:
        state = "done" if st.complete else ("partial" if st.done else "missing")
        count = f"{st.done}/{st.total if st.total is not None else '?'}"
        click.echo(f"{dataset:<14} {stage:<10} {state:<9} {count:>11}  {st.detail}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pipeline")
