"""The match stage's driver side, which reads no tensors: test pairs, settings and batches, the run's ledger,
reuse of batches other runs finished, and the stage's status (so ``pipeline status`` imports no torch).

A batch of pairs under a setting is one unit of work, recorded in the run's ledger ``<outputs>/<run>/.done/``
with its pair ids and alphas. A batch that another run under the same outputs store finished (same
dataset, setting key and label, pair ids and alphas, parts that read back) is hard-linked (or copied and
compared) into this run instead of being recomputed.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import damage, results
from pipeline.cache import Ledger, atomic_path
from pipeline.catalog import Catalog
from pipeline.context import StageContext, StageStatus
from pipeline.errors import CatalogError, StageError
from pipeline.features_store import FeatureStore, FeatureStoreError
from stages.datasets import normalize as normalize_stage
from stages.match.settings import MatcherSetting, resolve_settings
from stages.match.subsets import Subset, select_pairs

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

SPLIT = "test"
PAIRS_PER_BATCH = 16  # one solve per batch: 16 pairs of 60 x 60 grids keep GWOT's [B, N, M] tensors < 1 GB
PAIR_COLUMNS = (
    "pair_id", "split", "category", "src_image_id", "trg_image_id", "src_kps", "trg_kps", "kps_ids",
    "threshold_kind", "trg_bbox", "flip", "viewpoint_variation", "scale_variation", "truncation",
    "occlusion", "flow_path", "direction", "group", "variant",
)  # fmt: skip


@dataclass(frozen=True)
class BatchTask:
    """One unit of work: a batch of pairs under one setting, with everything a worker needs for it."""

    dataset: str
    batch: int
    setting: MatcherSetting
    backbone: str
    store_path: str
    random_weights: bool
    pairs: tuple[dict[str, Any], ...]  # pair rows (PAIR_COLUMNS), sorted by pair id
    image_sizes: dict[str, tuple[int, int]]  # (W, H) of the batch's images
    raw_dir: str
    alphas: tuple[float, ...]
    run_folder: str
    matcher: str  # the label its parts are filed under: see DatasetPlan.filed_labels

    @property
    def unit(self) -> str:
        """The ledger's name for this unit."""
        return ledger_unit(self.dataset, self.setting.key, self.batch)

    @property
    def pair_ids(self) -> list[str]:
        """The batch's pair ids, in order."""
        return [pair["pair_id"] for pair in self.pairs]

    def part_path(self, table: str, run_folder: str | Path | None = None, matcher: str | None = None) -> Path:
        """Where the batch's part of ``table`` is in its run (or in ``run_folder``, under label ``matcher``)."""
        folder, label = run_folder or self.run_folder, matcher or self.matcher
        return results.part_path(folder, table, self.dataset, label, self.setting.key, self.batch)

    def flow_paths(self, run_folder: str | Path | None = None, matcher: str | None = None) -> list[Path]:
        """The ``.flo`` files the batch's TSS directions write, in its run (or in ``run_folder``, under label
        ``matcher``)."""
        folder, label = run_folder or self.run_folder, matcher or self.matcher
        flows = results.flows_dir(folder, self.dataset, label, self.setting.key)
        return [flows / p["group"] / f"flow{p['direction'][0]}.flo" for p in self.pairs if p["direction"] is not None]

    def read_parts(self, run_folder: str | Path, matcher: str | None = None) -> dict[str, pa.Table] | None:
        """The batch's parts in ``run_folder`` (under label ``matcher``), by table, when both read back whole
        with all its pairs; else None (see :func:`pipeline.results.read_batch`)."""
        label, key = matcher or self.matcher, self.setting.key
        return results.read_batch(run_folder, self.dataset, label, key, self.batch, len(self.pairs))


def ledger_unit(dataset: str, setting_key: str, batch: int) -> str:
    """The ledger's name of batch ``batch`` of ``dataset`` under setting ``setting_key``."""
    return f"{dataset}/{setting_key}/{batch:05d}"


def run_ledger(run_folder: str | Path) -> Ledger:
    """The ledger of a run's finished batches, ``<run>/.done/``."""
    return Ledger(Path(run_folder) / ".done")


def ledger_record(task: BatchTask) -> dict[str, Any]:
    """What the ledger records of a finished batch: its pair ids and alphas."""
    return {"pair_ids": task.pair_ids, "alphas": list(task.alphas)}


def is_recorded(ledger: Ledger, task: BatchTask) -> bool:
    """Whether ``ledger`` records the task's unit as done for its pairs and alphas."""
    record = ledger.record(task.unit)
    return record is not None and all(record.get(name) == value for name, value in ledger_record(task).items())


def is_done(ledger: Ledger, task: BatchTask, run_folder: str | Path | None = None, matcher: str | None = None) -> bool:
    """Whether the unit is recorded for the task's pairs and alphas and its parts read back whole (in the
    task's run, or in the run ``run_folder`` that ``ledger`` belongs to, under label ``matcher``)."""
    return is_recorded(ledger, task) and task.read_parts(run_folder or task.run_folder, matcher) is not None


@dataclass(frozen=True)
class DatasetPlan:
    """Everything the driver needs to match one dataset: its store, settings and batches of test pairs."""

    dataset: str
    backbone: str
    store: FeatureStore
    settings: list[MatcherSetting]
    batches: list[tuple[dict[str, Any], ...]]
    image_sizes: dict[str, tuple[int, int]]

    @property
    def backbone_key(self) -> str:
        """The feature store's key."""
        return store_key(self.store)

    def filed_labels(self, run_folder: Path) -> dict[str, str]:
        """Setting key -> the label its parts are filed under in the run: the label it was first matched
        under there (a later ``--set`` of a default value, or another catalog name for the same parameters,
        finds its results where they are), else its own."""
        return {
            setting.key: next(iter(results.setting_labels(run_folder, self.dataset, setting.key)), setting.label)
            for setting in self.settings
        }

    def tasks(self, catalog: Catalog, run_folder: Path) -> list[BatchTask]:
        """Every unit of the plan: each batch under each setting."""
        labels = self.filed_labels(run_folder)
        return [
            BatchTask(
                dataset=self.dataset,
                batch=index,
                setting=setting,
                backbone=self.backbone,
                store_path=self.store.path,
                random_weights=self.store.random_weights,
                pairs=pairs,
                image_sizes={
                    image_id: self.image_sizes[image_id]
                    for pair in pairs
                    for image_id in (pair["src_image_id"], pair["trg_image_id"])
                },
                raw_dir=str(catalog.raw_dir(self.dataset)),
                alphas=catalog.evaluation.alphas,
                run_folder=str(run_folder),
                matcher=labels[setting.key],
            )
            for setting in self.settings
            for index, pairs in enumerate(self.batches)
        ]


def store_key(store: FeatureStore) -> str:
    """A feature store's key: its file name without ``.zarr`` (model, canvas, RANDOM, parameter hash)."""
    return store.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


def _open_store(ctx: StageContext, dataset: str, image_ids: Sequence[str]) -> tuple[str, FeatureStore]:
    """The chosen backbone's name and the dataset's feature store, which must hold every image of
    ``image_ids``; StageError naming the command to run when it does not."""
    # Imported here: the features stage imports timm and torchvision, which every worker process would
    # otherwise import (about 3 s each) when it unpickles a task of this module.
    from stages.features.stage import open_features, resolve_backbone

    backbone = resolve_backbone(ctx.catalog, ctx.options.backbone).name
    command = f"run `pipeline run --stage features --dataset {dataset} --backbone {backbone}`"
    try:
        store = open_features(ctx.catalog, dataset, backbone)
        store.rows_for(image_ids)
    except FeatureStoreError as error:
        raise StageError(str(error) if command in str(error) else f"{error}; {command}") from None
    missing = sum(len(rows) for _, rows in store.missing_shards())
    if missing:
        raise StageError(f"{store.path}: features of {missing} image(s) are not computed yet; {command}")
    return backbone, store


def run_subset(ctx: StageContext) -> Subset:
    """The test pairs this invocation matches: ``--category`` and ``--max-pairs``."""
    return Subset(categories=tuple(ctx.options.categories), max_pairs=ctx.options.max_pairs)


def plan_dataset(ctx: StageContext, dataset: str, batch_size: int) -> DatasetPlan:
    """Read the dataset's test pairs and feature store, resolve the settings and cut the batches."""
    if not normalize_stage.status(ctx, dataset).complete:
        raise StageError(
            f"dataset {dataset!r} is not normalised yet; run `pipeline run --stage normalize --dataset {dataset}`"
        )
    images, pairs = normalize_stage.read_tables(ctx.catalog.normalized_dir(dataset))
    # Filtered in Python: pyarrow's compute functions import pandas, which `pipeline status` has no use for.
    every = pairs.select(list(PAIR_COLUMNS)).to_pylist()
    test = sorted((pair for pair in every if pair["split"] == SPLIT), key=lambda pair: pair["pair_id"])
    if not test:
        found = ", ".join(sorted({pair["split"] for pair in every})) or "none"
        raise StageError(
            f"dataset {dataset!r} has no pairs of split {SPLIT!r} (the split the match stage scores); "
            f"its splits: {found}"
        )
    rows = select_pairs(test, run_subset(ctx), dataset)
    image_ids = [pair[side] for pair in rows for side in ("src_image_id", "trg_image_id")]
    backbone, store = _open_store(ctx, dataset, image_ids)
    sizes = {
        r["image_id"]: (r["width"], r["height"]) for r in images.select(["image_id", "width", "height"]).to_pylist()
    }
    settings = resolve_settings(ctx.catalog, ctx.options.matchers, ctx.options.overrides, store_key(store))
    if not settings:
        raise CatalogError(f"{ctx.catalog.path}: the catalog defines no matchers; add one under matchers:")
    flip_aware = [setting.label for setting in settings if setting.params.needs_flipped]
    if flip_aware and not store.flipped:
        raise StageError(
            f"matcher(s) {', '.join(flip_aware)} (flip: auto) read the mirrored images' features, which "
            f"{store.path} does not hold; set `flip: true` on backbone {backbone!r} in {ctx.catalog.path} "
            f"(backbones.{backbone}.flip) and run `pipeline run --stage features --dataset {dataset} "
            f"--backbone {backbone}`, or leave these matchers out with --matcher"
        )
    return DatasetPlan(
        dataset=dataset,
        backbone=backbone,
        store=store,
        settings=settings,
        batches=[tuple(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)],
        image_sizes=sizes,
    )


def drop_stale_batches(run_folder: Path, plan: DatasetPlan) -> None:
    """Remove parts and markers of batch indices the dataset no longer has (it shrank since a last run)."""
    ledger, labels = run_ledger(run_folder), plan.filed_labels(run_folder)
    for setting in plan.settings:
        for table in results.TABLES:
            folder = results.partition_dir(run_folder, table, plan.dataset, labels[setting.key], setting.key)
            for part in folder.glob("part-*.parquet"):
                batch = int(part.stem.removeprefix("part-"))
                if batch >= len(plan.batches):
                    part.unlink()
                    ledger.clear(ledger_unit(plan.dataset, setting.key, batch))


def status(ctx: StageContext, dataset: str) -> StageStatus:
    """Batches x settings recorded in the run's ledger, of those the dataset's test pairs need."""
    run_folder = results.run_dir(ctx.catalog.stores.outputs, ctx.options.run_name)
    config = results.read_run_config(run_folder)
    batch_size = config.get("pairs_per_batch", PAIRS_PER_BATCH)
    recorded = config.get("datasets", {}).get(dataset, {}).get("subset", {})  # status shows the run's subset
    options = replace(
        ctx.options, categories=tuple(recorded.get("categories", ())), max_pairs=recorded.get("max_pairs")
    )
    try:
        results.check_layout(run_folder)
        plan = plan_dataset(replace(ctx, options=options), dataset, batch_size)
    except (StageError, CatalogError, results.OldLayoutError) as error:
        return StageStatus(0, None, str(error))
    ledger = run_ledger(run_folder)
    tasks = plan.tasks(ctx.catalog, run_folder)
    done = sum(is_done(ledger, task) for task in tasks)
    detail = f"run {ctx.options.run_name}: {len(plan.settings)} setting(s) x {len(plan.batches)} batch(es)"
    if options.categories or options.max_pairs is not None:
        detail += f" of {run_subset(replace(ctx, options=options)).text()}"
    return StageStatus(done, len(tasks), detail)


def _finished_elsewhere(task: BatchTask, run_folder: Path) -> str | None:
    """The label under which run ``run_folder`` finished the task's batch (the same setting key, perhaps under
    another label: the parts hold none), or None: recorded for its pairs and alphas, both parts intact,
    written for the same catalog matcher and backbone, its TSS flows present. Only looked at: damage found
    there is neither reported nor set aside (that run repairs it when it runs)."""
    same = {"matcher_name": task.setting.name, "backbone": task.backbone, "random_weights": task.random_weights}
    if not is_recorded(run_ledger(run_folder), task):
        return None
    for label in results.setting_labels(run_folder, task.dataset, task.setting.key):
        with damage.collecting(repair=False):
            parts = task.read_parts(run_folder, label)
        if parts is None:
            continue
        part = parts["pairs"]
        labelled = all(set(part[name].to_pylist()) == {value} for name, value in same.items())
        if labelled and all(path.is_file() for path in task.flow_paths(run_folder, label)):
            return label
    return None


def _link_or_copy(source: Path, target: Path) -> str:
    """Put ``source`` at ``target`` (atomically): a hard link, or where the store refuses one, a copy compared
    byte for byte; returns ``linked`` or ``copied``."""
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
            how = "linked"
        except OSError:
            shutil.copyfile(source, tmp)
            if not filecmp.cmp(source, tmp, shallow=False):
                raise StageError(f"{target}: the copy of {source} differs from it; check the disk") from None
            how = "copied"
    return how


def reuse_finished(ledger: Ledger, tasks: Sequence[BatchTask]) -> list[BatchTask]:
    """Take each task's batch from another run under the same outputs store that finished it (see
    :func:`_finished_elsewhere`), its parts and flows hard-linked (or copied), and record it in ``ledger``;
    logs one line of what was reused. Returns the tasks still to compute."""
    remaining, reused, donors, ways = [], set(), set(), set()
    for task in tasks:
        run_folder = Path(task.run_folder)
        others = sorted(p for p in run_folder.parent.iterdir() if p != run_folder and (p / ".done").is_dir())
        found = ((other, _finished_elsewhere(task, other)) for other in others)
        donor, label = next(((other, label) for other, label in found if label is not None), (None, None))
        if donor is None:
            remaining.append(task)
            continue
        sources = [task.part_path(t, donor, label) for t in results.TABLES] + task.flow_paths(donor, label)
        targets = [task.part_path(table) for table in results.TABLES] + task.flow_paths()
        ways.update(_link_or_copy(source, target) for source, target in zip(sources, targets, strict=True))
        ledger.mark_done(task.unit, ledger_record(task))
        reused.add(task.matcher)
        donors.add(donor.name)
    if reused:
        log.info(
            "match: reused %d batch(es) of %s finished by run(s) %s (%s, not recomputed)",
            len(tasks) - len(remaining),
            ", ".join(sorted(reused)),
            ", ".join(sorted(donors)),
            " and ".join(sorted(ways)),
        )
    return remaining
