"""Run stages in order and read their status; each registered stage has ``run(ctx)`` and ``status(ctx, dataset)``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict

from pipeline import registry
from pipeline.cache import check_store_root, sweep_temporaries
from pipeline.catalog import Catalog
from pipeline.context import RunOptions, StageContext, StageStatus

log = logging.getLogger(__name__)


def select_datasets(catalog: Catalog, names: Iterable[str]) -> tuple[str, ...]:
    """The datasets named (all of the catalog's when none), checked against the catalog."""
    names = tuple(names) or tuple(catalog.datasets)
    for name in names:
        catalog.dataset(name)
    return names


def run_stages(catalog: Catalog, stages: Sequence[str], datasets: Sequence[str], options: RunOptions) -> None:
    """Run ``stages`` (all, when empty) in pipeline order over ``datasets`` (all, when empty)."""
    order = tuple(registry.stages())
    for name in stages:
        registry.stage_module(name)  # an unknown stage is an error before any stage runs
    selected = [s for s in order if s in set(stages)] if stages else list(order)
    ctx = StageContext(catalog=catalog, datasets=select_datasets(catalog, datasets), options=options)
    for root, path in asdict(catalog.stores).items():
        check_store_root(path, f"stores.{root}")
        for removed in sweep_temporaries(path):
            log.info("removed %s, left unfinished by a run that stopped", removed)
    for name in selected:
        start = time.perf_counter()
        log.info("stage %s: %s", name, ", ".join(ctx.datasets))
        registry.stage_module(name).run(ctx)
        log.info("stage %s finished in %.1f s", name, time.perf_counter() - start)


def status_table(
    catalog: Catalog, datasets: Sequence[str], options: RunOptions | None = None
) -> list[tuple[str, str, StageStatus]]:
    """``(dataset, stage, status)`` for every selected dataset and stage (``options``: backbone and run)."""
    ctx = StageContext(catalog=catalog, datasets=select_datasets(catalog, datasets), options=options or RunOptions())
    return [
        (dataset, name, registry.stage_status(name)(ctx, dataset))
        for dataset in ctx.datasets
        for name in registry.stages()
    ]
