"""What every stage entry receives: the catalog, the selected datasets and the run's options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.catalog import Catalog


@dataclass(frozen=True)
class RunOptions:
    """Command-line choices that apply to every stage of one ``pipeline run``."""

    force: bool = False  # recompute units that are already committed
    verify: bool = False  # features: read every stored chunk back and recompute shards that fail a checksum
    skip_bad: bool = False  # record malformed items in a report instead of stopping (normalize)
    archives: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)  # dataset -> hand-placed files
    progress: bool = True  # show progress bars
    scheduler: str | None = None  # address of an existing Dask scheduler; overrides the catalog's
    backbone: str | None = None  # features: a catalog backbone name; None: its default_backbone
    matchers: tuple[str, ...] = ()  # match: catalog matcher names; empty: all of the catalog's
    overrides: tuple[str, ...] = ()  # match: --set MATCHER.KEY=V1,V2 sweeps
    run_name: str = "default"  # match: results go to <outputs>/<run_name>/
    categories: tuple[str, ...] = ()  # match: only test pairs of these categories; empty: all
    max_pairs: int | None = None  # match: at most this many test pairs per dataset (a fixed sample)


@dataclass(frozen=True)
class StageStatus:
    """How far one stage is for one dataset: units done out of the units known (``total`` None: unknown)."""

    done: int
    total: int | None
    detail: str = ""

    @property
    def complete(self) -> bool:
        """Whether every known unit is done (a stage with no known units is not complete)."""
        return self.total is not None and self.total > 0 and self.done >= self.total


@dataclass(frozen=True)
class StageContext:
    """A stage entry's inputs: ``run(ctx)`` does the work, ``status(ctx, dataset)`` reports progress."""

    catalog: Catalog
    datasets: tuple[str, ...]
    options: RunOptions = field(default_factory=RunOptions)
