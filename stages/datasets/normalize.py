"""The normalize stage: turn each dataset's raw files into ``images.parquet`` and ``pairs.parquet``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import registry
from pipeline.cache import Ledger, atomic_path
from pipeline.context import StageContext, StageStatus
from pipeline.damage import repairing, report_damage
from pipeline.errors import DataError, StageError
from stages.datasets.common import BadItems
from stages.datasets.schema import BAD_ITEMS_SCHEMA, IMAGES_SCHEMA, PAIRS_SCHEMA

log = logging.getLogger(__name__)

UNIT = "normalized"


class NormalizedTables(NamedTuple):
    """The file names of a normalised dataset's tables."""

    images: str
    pairs: str
    bad_items: str


TABLES = NormalizedTables("images.parquet", "pairs.parquet", "bad_items.parquet")
RECORD_KEYS = NormalizedTables._fields  # the ledger's row count of each table


def run(ctx: StageContext) -> None:
    """Normalise every selected dataset whose tables are missing or damaged (all of them with ``--force``).

    ``--force`` keeps the old tables and their marker until the new parse succeeded.
    """
    for name in ctx.datasets:
        out_dir = ctx.catalog.normalized_dir(name)
        ledger = Ledger(out_dir / ".done")
        if _committed(ledger, out_dir, name) and not ctx.options.force:
            log.info("normalize %s: already done", name)
            continue
        spec = ctx.catalog.dataset(name)
        download_stage = registry.stage_module("download")  # by name: the two stages share no code
        if not spec.sources and not download_stage.status(ctx, name).complete:
            # A generated dataset (the demo) has nothing to download: make it here, offline and cheap.
            download_stage.run(StageContext(catalog=ctx.catalog, datasets=(name,), options=ctx.options))
        if not download_stage.status(ctx, name).complete:
            raise StageError(
                f"dataset {name!r} is not downloaded yet; run `pipeline run --stage download --dataset {name}`"
            )
        images, pairs, bad = normalize_dataset(ctx, name)
        _check_references(name, images, pairs)
        _check_splits(ctx, name, pairs)
        ledger.clear(UNIT)  # the new tables replace the old ones: only now are the old ones given up
        for table, filename, schema in (
            (images, TABLES.images, IMAGES_SCHEMA),
            (pairs, TABLES.pairs, PAIRS_SCHEMA),
            (pa.Table.from_pylist(bad.rows(), schema=BAD_ITEMS_SCHEMA), TABLES.bad_items, BAD_ITEMS_SCHEMA),
        ):
            with atomic_path(out_dir / filename) as tmp:
                pq.write_table(table.cast(schema), tmp, write_page_checksum=True)
        ledger.mark_done(UNIT, {"images": images.num_rows, "pairs": pairs.num_rows, "bad_items": len(bad.items)})
        if bad.items:
            log.warning(
                "normalize %s: %d bad item(s) skipped, listed in %s",
                name,
                len(bad.items),
                out_dir / TABLES.bad_items,
            )
        log.info("normalize %s: %d images, %d pairs", name, images.num_rows, pairs.num_rows)


def _check_splits(ctx: StageContext, name: str, pairs: pa.Table) -> None:
    """A selected split without pairs is an error naming its pair list (with ``--skip-bad``: a warning)."""
    spec = ctx.catalog.dataset(name)
    module = registry.dataset_module(spec.kind)
    found = set(pairs.column("split").to_pylist())
    for split in dict.fromkeys(spec.splits):
        if split in found:
            continue
        raw = ctx.catalog.raw_dir(name)
        source = module.pair_list(raw, spec, split) if hasattr(module, "pair_list") else raw
        problem = f"split {split!r} of dataset {name!r} has no pairs after normalisation"
        if not ctx.options.skip_bad:
            raise DataError(source, f"{problem}; check the file, or pass --skip-bad to keep an empty split")
        log.warning("%s: %s; the match stage will refuse to score it", source, problem)


def _committed(ledger: Ledger, out_dir: Path, name: str) -> bool:
    """Whether the dataset's tables are committed and read back intact with the row counts recorded.

    A damaged table is reported; during a run it is set aside and the marker dropped, so the dataset is
    normalised again.
    """
    record = ledger.record(UNIT, RECORD_KEYS)
    if record is None:
        return False
    for filename, key in zip(TABLES, RECORD_KEYS, strict=True):
        path = out_dir / filename
        try:
            with pq.ParquetFile(path, page_checksum_verification=True) as file:  # not read_table: no pandas
                rows = file.read().num_rows
        except FileNotFoundError:
            problem = "the table is missing"
        except (pa.ArrowException, OSError) as error:
            problem = f"unreadable Parquet table ({type(error).__name__}: {error})"
        else:
            if rows == record[key]:
                continue
            problem = f"the table holds {rows} rows, the ledger recorded {record[key]}"
        report_damage(path, problem, f"normalises dataset {name!r} again")
        if repairing():
            ledger.clear(UNIT)
        return False
    return True


def normalize_dataset(ctx: StageContext, name: str) -> tuple[pa.Table, pa.Table, BadItems]:
    """Run the dataset's normaliser over its raw folder; returns (images, pairs, bad items)."""
    spec = ctx.catalog.dataset(name)
    bad = BadItems(dataset=name, skip_bad=ctx.options.skip_bad)
    images, pairs = registry.dataset_module(spec.kind).normalize(ctx.catalog.raw_dir(name), spec, bad)
    return images, pairs, bad


def _check_references(name: str, images: pa.Table, pairs: pa.Table) -> None:
    """Every pair must point at images in the images table, and ids must be unique."""
    image_ids = images.column("image_id").to_pylist()
    if len(set(image_ids)) != len(image_ids):
        raise StageError(f"dataset {name!r}: the normaliser produced duplicate image ids")
    pair_ids = pairs.column("pair_id").to_pylist()
    if len(set(pair_ids)) != len(pair_ids):
        raise StageError(f"dataset {name!r}: the normaliser produced duplicate pair ids")
    known = set(image_ids)
    for column in ("src_image_id", "trg_image_id"):
        missing = set(pairs.column(column).to_pylist()) - known
        if missing:
            raise StageError(f"dataset {name!r}: pairs reference unknown images, e.g. {sorted(missing)[0]!r}")


def status(ctx: StageContext, dataset: str) -> StageStatus:
    """Done when both tables are committed."""
    out_dir = ctx.catalog.normalized_dir(dataset)
    ledger = Ledger(out_dir / ".done")
    if not _committed(ledger, out_dir, dataset):
        return StageStatus(0, 1)
    record = ledger.record(UNIT, RECORD_KEYS)
    return StageStatus(1, 1, f"{record['images']} images, {record['pairs']} pairs, {record['bad_items']} bad")


def read_tables(out_dir: Path) -> tuple[pa.Table, pa.Table]:
    """Read a dataset's normalised ``(images, pairs)`` tables (through ParquetFile: ``pq.read_table`` imports
    pandas, which ``pipeline status`` has no use for)."""
    with pq.ParquetFile(out_dir / TABLES.images) as images, pq.ParquetFile(out_dir / TABLES.pairs) as pairs:
        return images.read(), pairs.read()
