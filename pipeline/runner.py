"""Stage order and dispatch: every stage entry exposes ``run(ctx)`` and ``status(ctx, dataset)``."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from types import ModuleType

from pipeline.cache import check_store_root, sweep_temporaries
from pipeline.catalog import Catalog
from pipeline.context import RunOptions, StageContext, StageStatus
from pipeline.errors import CatalogError

log = logging.getLogger(__name__)

# Stage name -> module holding its entry, in the order a full run executes them.
STAGES = {
    "download": "stages.download.stage",
    "normalize": "stages.datasets.stage",
    "features": "stages.features.stage",
    "match": "stages.match.stage",
    "report": "stages.report.stage",
}
STAGE_ORDER = tuple(STAGES)


def stage_module(name: str) -> ModuleType:
    """The module implementing stage ``name``."""
    if name not in STAGES:
        raise CatalogError(f"unknown stage {name!r}; valid stages: {', '.join(STAGE_ORDER)}")
    return importlib.import_module(STAGES[name])


def select_datasets(catalog: Catalog, names: Iterable[str]) -> tuple[str, ...]:
    """The datasets named (all of the catalog's when none), checked against the catalog."""
    names = tuple(names) or tuple(catalog.datasets)
    for name in names:
        catalog.dataset(name)
    return names


def run_stages(catalog: Catalog, stages: Sequence[str], datasets: Sequence[str], options: RunOptions) -> None:
    """Run ``stages`` (all, when empty) in pipeline order over ``datasets`` (all, when empty)."""
    selected = [s for s in STAGE_ORDER if s in set(stages)] if stages else list(STAGE_ORDER)
    ctx = StageContext(catalog=catalog, datasets=select_datasets(catalog, datasets), options=options)
    for root, path in asdict(catalog.stores).items():
        check_store_root(path, f"stores.{root}")
        for removed in sweep_temporaries(path):
            log.info("removed %s, left unfinished by a run that stopped", removed)
    for name in selected:
        start = time.perf_counter()
        log.info("stage %s: %s", name, ", ".join(ctx.datasets))
        stage_module(name).run(ctx)
        log.info("stage %s finished in %.1f s", name, time.perf_counter() - start)


def status_table(
    catalog: Catalog, datasets: Sequence[str], options: RunOptions | None = None
) -> list[tuple[str, str, StageStatus]]:
    """``(dataset, stage, status)`` for every selected dataset and stage (``options``: backbone and run)."""
    ctx = StageContext(catalog=catalog, datasets=select_datasets(catalog, datasets), options=options or RunOptions())
    return [
        (dataset, name, stage_module(name).status(ctx, dataset)) for dataset in ctx.datasets for name in STAGE_ORDER
    ]
