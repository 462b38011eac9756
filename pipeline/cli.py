"""The ``pipeline`` command line: run stages and show their status; the stages add their own commands (registry)."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import click

from pipeline import damage, registry
from pipeline.catalog import DEFAULT_CATALOG, load_catalog
from pipeline.context import RunOptions
from pipeline.errors import PipelineError
from pipeline.runner import run_stages, status_table


class _PipelineGroup(click.Group):
    """The commands defined here and those the stages registered (imported when listed or called).

    A PipelineError is printed as one clear line with exit status 1, instead of a traceback.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *registry.commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        registered = registry.commands()
        if name in registered:
            return registry.resolve(registered[name])
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_PipelineGroup)
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
    type=click.Choice(tuple(registry.stages())),
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
    for check in registry.run_checks():  # before any stage starts: bad values named where they came from
        registry.resolve(check)(catalog, options)
    with damage.collecting() as found:
        try:
            run_stages(catalog, stages, datasets, options)
        finally:
            if verify:
                _echo_damage(found, "verify: every record read back intact")
    for name, entry in registry.stages().items():
        if entry.announce and (not stages or name in stages):
            click.echo(registry.resolve(entry.announce)(catalog, run_name))


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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pipeline")
