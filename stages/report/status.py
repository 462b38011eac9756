"""Whether a run's report is up to date: the report stage's status, which imports neither pandas nor matplotlib."""

from __future__ import annotations

from pathlib import Path

from pipeline import results
from pipeline.context import StageContext, StageStatus

REPORT_DIR = "report"
PARTS = "dataset=*/matcher=*/setting=*/part-*.parquet"  # every result part of a table (pipeline.results)


def report_dir(run_folder: str | Path) -> Path:
    """The folder of a run's report."""
    return Path(run_folder) / REPORT_DIR


def is_up_to_date(run_folder: Path) -> bool:
    """Whether the run's report exists and is newer than its config.json and every result part."""
    index = report_dir(run_folder) / "index.html"
    inputs = [run_folder / "config.json", *run_folder.glob(f"*/{PARTS}")]
    existing = [path.stat().st_mtime_ns for path in inputs if path.is_file()]
    return index.is_file() and bool(existing) and index.stat().st_mtime_ns >= max(existing)


def status(ctx: StageContext, dataset: str) -> StageStatus:
    """Done when the run's report exists and is newer than every result part of ``dataset``."""
    run_folder = results.run_dir(ctx.catalog.stores.outputs, ctx.options.run_name)
    try:
        results.check_layout(run_folder)
    except results.OldLayoutError as error:
        return StageStatus(0, None, str(error))
    parts = list((run_folder / "pairs").glob(PARTS.replace("dataset=*", f"dataset={dataset}", 1)))
    if not parts:
        return StageStatus(0, None, f"run {ctx.options.run_name}: no results of {dataset} yet")
    index = report_dir(run_folder) / "index.html"
    fresh = index.is_file() and index.stat().st_mtime_ns >= max(part.stat().st_mtime_ns for part in parts)
    return StageStatus(int(fresh), 1, str(index) if fresh else f"{index}: missing or older than the results")
