"""The match stage: every test pair under every matcher setting, matched on Dask workers, scored into Parquet.

For each dataset the driver reads the normalised pairs of split ``test`` (the benchmarks' scored split;
a dataset without test pairs is an error), opens the feature store of the chosen backbone and resolves
the matcher settings (catalog matchers, expanded over ``--set`` sweeps). The pairs, sorted by id, are cut
into batches of ``PAIRS_PER_BATCH``; a batch under a setting is one unit of work, recorded in the run's
ledger ``<outputs>/<run>/.done/`` with its pair ids and alphas. A re-run submits only the units that are
not recorded (or whose pairs or alphas changed), ``--force`` all of them.

A task (on a worker, on its GPU when it has one) reads the batch's tokens, solves every pair at once (all
images of a store share one patch grid), reads out keypoints and, where a ground-truth flow exists, a
dense flow at the source image's resolution, then writes its own part files (see :mod:`pipeline.results`)
and last its ledger marker, so writers never collide and a killed run resumes with every pair once.

Scoring: PCK at every catalog alpha with the pair's threshold kind, ``error <= alpha * ref_length`` in
original target pixels; flows (TSS and the demo's exact ground truth) with the TSS kit's T1..T50. TSS's
predicted flows are also kept as ``.flo`` files in the kit's layout for ``pipeline export-tss``.

Batches are deterministic, so reruns, resumes and any number of workers agree.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from distributed import Client, as_completed
from PIL import Image

from pipeline import results
from pipeline.cache import Ledger, atomic_path
from pipeline.catalog import Catalog
from pipeline.cluster import dask_client
from pipeline.context import StageContext, StageStatus
from pipeline.errors import CatalogError, PipelineError, StageError
from pipeline.features_store import CorruptFeaturesError, FeatureStore, FeatureStoreError
from pipeline.progress import progress_bar
from pipeline.provenance import provenance
from stages.datasets import stage as normalize_stage
from stages.datasets.flo import read_flo, write_flo
from stages.datasets.tss import ROOT as TSS_ROOT
from stages.datasets.tss import SUBSETS as TSS_SUBSETS
from stages.evaluate.pck import correct_keypoints, keypoint_errors, pck_per_pair, reference_length
from stages.evaluate.tss import TssScores, score_direction, score_tss_results
from stages.features.canvas import CanvasTransform
from stages.match import dense_flow, nn_match, transfer_keypoints
from stages.match.plans import TransportPlan
from stages.match.robust import robust_gwot
from stages.match.settings import MatcherSetting, NNParams, resolve_settings
from stages.match.subsets import Subset, check_run_subset, select_pairs

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

    @property
    def unit(self) -> str:
        """The ledger's name for this unit."""
        return ledger_unit(self.dataset, self.setting.key, self.batch)

    @property
    def pair_ids(self) -> list[str]:
        """The batch's pair ids, in order."""
        return [pair["pair_id"] for pair in self.pairs]


def ledger_unit(dataset: str, setting_key: str, batch: int) -> str:
    """The ledger's name of batch ``batch`` of ``dataset`` under setting ``setting_key``."""
    return f"{dataset}/{setting_key}/{batch:05d}"


@dataclass(frozen=True)
class Solution:
    """A batch's scores ``[B, N, M]`` as a :class:`TransportPlan` (NN similarities stored in full, or GWOT's
    plans in original source coordinates, windowed by coarse-to-fine; ``scores[b]`` is pair ``b``'s, as the
    readout takes them) and,
    per pair, the matcher's own columns of the pairs table (:data:`ROBUST_COLUMNS`)."""

    scores: TransportPlan
    columns: list[dict[str, Any]]


ROBUST_COLUMNS = ("orientation", "objective_original", "objective_mirrored", "scale_estimate", "k_src", "k_trg")
SOLVER_COLUMNS = ("outer_steps", "inner_iters", "objective", "marginal_error", "converged")


def _or_none(value: Any) -> Any:
    """NaN (an option that is off) as a null cell."""
    return None if isinstance(value, float) and math.isnan(value) else value


def solve(
    setting: MatcherSetting,
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor,
    trg_valid: torch.Tensor,
    src_flipped: torch.Tensor | None = None,
) -> Solution:
    """Solve a batch (features ``[B, H, W, C]``; ``src_flipped``: the mirrored source images' features,
    needed by flip-aware settings): NN similarities or flip/scale-aware GWOT plans, with per-pair columns
    (:data:`ROBUST_COLUMNS` and the kept solve's convergence, :data:`SOLVER_COLUMNS`; null for NN).

    GWOT does not warn here (``warn=False``: warning filters are not thread-safe, and Dask runs batches in
    threads): whether each pair converged is a column, and the match stage reports the count once per run.
    """
    if isinstance(setting.params, NNParams):
        scores = TransportPlan(nn_match(src_feats, trg_feats, src_valid, trg_valid).similarity)
        return Solution(scores, [dict.fromkeys(ROBUST_COLUMNS + SOLVER_COLUMNS) for _ in range(len(scores))])
    result = robust_gwot(
        src_feats,
        trg_feats,
        src_valid,
        trg_valid,
        src_flipped=src_flipped,
        **setting.params.solver_kwargs(),
        warn=False,
    )
    per_pair = {
        "orientation": ["mirrored" if mirrored else "original" for mirrored in result.mirrored.tolist()],
        "objective_original": result.objective.tolist(),
        "objective_mirrored": result.objective_mirrored.tolist(),
        "scale_estimate": result.scale.tolist(),
        "k_src": result.k_src.tolist(),
        "k_trg": result.k_trg.tolist(),
        **{name: getattr(result.solver, name).tolist() for name in SOLVER_COLUMNS},
    }
    columns = [
        {name: _or_none(values[index]) for name, values in per_pair.items()} for index in range(len(result.plan))
    ]
    return Solution(result.plan, columns)


def readout_options(setting: MatcherSetting) -> dict[str, Any]:
    """Similarities are read through a softmax at the setting's temperature; plans as they are."""
    temperature = setting.params.temperature if isinstance(setting.params, NNParams) else None
    return {"window": setting.params.window, "temperature": temperature}


def _batch_features(
    store: FeatureStore, image_ids: Sequence[str], device: torch.device, *, flipped: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Tokens ``[B, H, W, C]`` float32 and valid ``[B, H, W]`` of ``image_ids`` on ``device``, and their rows
    (``flipped``: the mirrored images' tokens instead).

    Each distinct image is read once (TSS and SPair reuse images across pairs).
    """
    rows = store.rows_for(image_ids)
    unique = sorted(set(rows))
    tokens, valid = store.read(unique, flipped=flipped)
    position = [unique.index(row) for row in rows]
    feats = torch.from_numpy(tokens[position].astype(np.float32)).to(device)
    return feats, torch.from_numpy(valid[position]).to(device), rows


def _score_keypoints(
    task: BatchTask, pair: dict[str, Any], scores: TransportPlan, transforms: tuple[CanvasTransform, CanvasTransform]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pair's PCK columns and its keypoint rows."""
    src_kps = np.asarray(pair["src_kps"], dtype=np.float64).reshape(-1, 2)
    trg_kps = np.asarray(pair["trg_kps"], dtype=np.float64).reshape(-1, 2)
    alphas = np.asarray(task.alphas, dtype=np.float64)
    if len(src_kps) == 0:
        return {"n_kps": 0, "ref_length": None, "n_correct": [0] * len(alphas), "pck": [np.nan] * len(alphas)}, []
    pred = transfer_keypoints(scores, src_kps, *transforms, **readout_options(task.setting))
    errors = keypoint_errors(pred, trg_kps)
    ref_length = reference_length(
        pair["threshold_kind"],
        trg_image_size=task.image_sizes[pair["trg_image_id"]],
        trg_bbox=pair["trg_bbox"],
        trg_kps=trg_kps,
    )
    thresholds = alphas * ref_length
    columns = {
        "n_kps": len(src_kps),
        "ref_length": ref_length,
        "n_correct": correct_keypoints(errors, thresholds).sum(axis=-1).tolist(),
        "pck": pck_per_pair(errors, thresholds).tolist(),
    }
    keypoints = [
        {
            "pair_id": pair["pair_id"],
            "kp_index": index,
            "kps_id": pair["kps_ids"][index],
            "src_x": src[0],
            "src_y": src[1],
            "pred_x": p[0],
            "pred_y": p[1],
            "trg_x": t[0],
            "trg_y": t[1],
            "error": error,
            "ref_length": ref_length,
            "threshold_kind": pair["threshold_kind"],
        }
        for index, (src, p, t, error) in enumerate(zip(src_kps, pred, trg_kps, errors, strict=True))
    ]
    return columns, keypoints


def _score_flow(
    task: BatchTask, pair: dict[str, Any], scores: TransportPlan, transforms: tuple[CanvasTransform, CanvasTransform]
) -> list[float] | None:
    """T1..T50 accuracies of the dense flow against the pair's ground truth (None without one); a TSS
    direction's flow is also written as ``flow<n>.flo`` in the kit's layout."""
    if pair["flow_path"] is None:
        return None
    flow = dense_flow(scores, *transforms, **readout_options(task.setting))
    gt_flow = read_flo(Path(task.raw_dir) / pair["flow_path"])
    accuracy = score_direction(flow, gt_flow, task.image_sizes[pair["trg_image_id"]])
    if pair["direction"] is not None:
        folder = results.flows_dir(task.run_folder, task.dataset, task.setting.key) / pair["group"]
        folder.mkdir(parents=True, exist_ok=True)
        # TSS directions are named <src image number>to<trg image number>; flow1 starts from image1.
        with atomic_path(folder / f"flow{pair['direction'][0]}.flo") as tmp:
            write_flo(tmp, flow)
    return accuracy.tolist()


def match_batch(task: BatchTask) -> int:
    """Worker side: match, score and write one batch, then record it in the ledger; returns its pair count."""
    store = FeatureStore.open(task.store_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src_feats, src_valid, src_rows = _batch_features(store, [p["src_image_id"] for p in task.pairs], device)
    trg_feats, trg_valid, trg_rows = _batch_features(store, [p["trg_image_id"] for p in task.pairs], device)
    src_flipped = None
    if task.setting.params.needs_flipped:
        src_flipped = _batch_features(store, [p["src_image_id"] for p in task.pairs], device, flipped=True)[0]
    start = time.perf_counter()
    solution = solve(task.setting, src_feats, trg_feats, src_valid, trg_valid, src_flipped)
    scores = solution.scores
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(task.pairs)
    labels = {
        "matcher_name": task.setting.name,
        "matcher_label": task.setting.label,
        "method": task.setting.method,
        "params_json": json.dumps(asdict(task.setting.params), sort_keys=True),
        "backbone": task.backbone,
        "backbone_key": task.setting.backbone_key,
        "random_weights": task.random_weights,
        "batch": task.batch,
        "alphas": list(task.alphas),
        "solve_seconds": seconds,
    }
    pair_rows, keypoint_rows = [], []
    for index, pair in enumerate(task.pairs):
        transforms = (
            CanvasTransform(**store.transforms[src_rows[index]]),
            CanvasTransform(**store.transforms[trg_rows[index]]),
        )
        try:
            pck_columns, keypoints = _score_keypoints(task, pair, scores[index], transforms)
            flow_accuracy = _score_flow(task, pair, scores[index], transforms)
        except (ValueError, PipelineError) as error:  # bad annotations or files: name the pair
            raise StageError(f"pair {pair['pair_id']!r} of dataset {task.dataset!r}: {error}") from error
        metadata = {name: pair[name] for name in results.PAIRS_SCHEMA.names if name in pair}
        pair_rows.append(
            {**metadata, **labels, **pck_columns, **solution.columns[index], "flow_accuracy": flow_accuracy}
        )
        keypoint_rows += keypoints
    folder = task.run_folder
    key = task.setting.key
    record = provenance(device_name(device))
    results.write_part(
        results.part_path(folder, "keypoints", task.dataset, key, task.batch),
        keypoint_rows,
        results.KEYPOINTS_SCHEMA,
        record,
    )
    results.write_part(
        results.part_path(folder, "pairs", task.dataset, key, task.batch), pair_rows, results.PAIRS_SCHEMA, record
    )
    _ledger(folder).mark_done(task.unit, {"pair_ids": task.pair_ids, "alphas": list(task.alphas)})
    return len(task.pairs)


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda (<GPU model>)``: the device a provenance record names."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _ledger(run_folder: str | Path) -> Ledger:
    return Ledger(Path(run_folder) / ".done")


def _is_done(ledger: Ledger, task: BatchTask) -> bool:
    """Whether the unit is recorded for the task's pairs and alphas and its parts read back whole."""
    record = ledger.record(task.unit)
    return (
        record is not None
        and record.get("pair_ids") == task.pair_ids
        and record.get("alphas") == list(task.alphas)
        and results.batch_intact(task.run_folder, task.dataset, task.setting.key, task.batch, len(task.pairs))
    )


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

    def tasks(self, catalog: Catalog, run_folder: Path) -> list[BatchTask]:
        """Every unit of the plan: each batch under each setting."""
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
    test = pairs.filter(pc.equal(pairs["split"], SPLIT)).sort_by("pair_id").select(list(PAIR_COLUMNS))
    if test.num_rows == 0:
        found = ", ".join(sorted(set(pairs["split"].to_pylist()))) or "none"
        raise StageError(
            f"dataset {dataset!r} has no pairs of split {SPLIT!r} (the split the match stage scores); "
            f"its splits: {found}"
        )
    rows = select_pairs(test.to_pylist(), run_subset(ctx), dataset)
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


def _drop_stale_batches(run_folder: Path, plan: DatasetPlan) -> None:
    """Remove parts and markers of batch indices the dataset no longer has (it shrank since a last run)."""
    ledger = _ledger(run_folder)
    for setting in plan.settings:
        for table in results.TABLES:
            folder = results.part_path(run_folder, table, plan.dataset, setting.key, 0).parent
            for part in folder.glob("part-*.parquet"):
                batch = int(part.stem.removeprefix("part-"))
                if batch >= len(plan.batches):
                    part.unlink()
                    ledger.clear(ledger_unit(plan.dataset, setting.key, batch))


def _record_config(ctx: StageContext, run_folder: Path, plans: Sequence[DatasetPlan], batch_size: int) -> None:
    results.update_run_config(
        run_folder,
        {
            "run": ctx.options.run_name,
            "catalog": ctx.catalog.path,
            "split": SPLIT,
            "alphas": list(ctx.catalog.evaluation.alphas),
            "pairs_per_batch": batch_size,
            "datasets": {
                plan.dataset: {
                    "backbone": plan.backbone,
                    "backbone_key": plan.backbone_key,
                    "feature_store": plan.store.path,
                    "random_weights": plan.store.random_weights,
                    "n_pairs": sum(len(batch) for batch in plan.batches),
                    "subset": run_subset(ctx).describe(),
                }
                for plan in plans
            },
            "settings": {setting.key: setting.describe() for plan in plans for setting in plan.settings},
            "provenance": provenance(device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))),
        },
    )


def _run_tasks(client: Client, tasks: Sequence[BatchTask], progress: bool) -> list[tuple[BatchTask, BaseException]]:
    """Submit every task (one retry each) and wait for all; returns the tasks that failed twice."""
    futures = {client.submit(match_batch, task, retries=1, pure=False): task for task in tasks}
    failures = []
    total = sum(len(task.pairs) for task in tasks)
    with progress_bar(enabled=progress, total=total, desc="match", unit="pair") as bar:
        for future in as_completed(futures):
            if future.status == "error":
                failures.append((futures[future], future.exception()))
            else:
                bar.update(future.result())
    return failures


def match(ctx: StageContext, batch_size: int) -> None:
    """The stage's work in batches of ``batch_size`` pairs (``run`` uses ``PAIRS_PER_BATCH``)."""
    run_folder = results.run_dir(ctx.catalog.stores.outputs, ctx.options.run_name)
    plans = [plan_dataset(ctx, dataset, batch_size) for dataset in ctx.datasets]
    config = results.read_run_config(run_folder)
    for plan in plans:
        check_run_subset(config, plan.dataset, run_subset(ctx), ctx.options.run_name)
    _record_config(ctx, run_folder, plans, batch_size)
    ledger = _ledger(run_folder)
    tasks = []
    for plan in plans:
        _drop_stale_batches(run_folder, plan)
        tasks += [
            task for task in plan.tasks(ctx.catalog, run_folder) if ctx.options.force or not _is_done(ledger, task)
        ]
    # Markers stay until each batch's new parts replace the old ones: a forced run that stops keeps results.
    failures = []
    if tasks:
        log.info("match: %d batch(es) of %d pair(s) to compute", len(tasks), sum(len(t.pairs) for t in tasks))
        with dask_client(ctx.catalog.cluster, ctx.options.scheduler) as client:
            failures = _run_tasks(client, tasks, ctx.options.progress)
    else:
        log.info("match: every batch of run %r is already done", ctx.options.run_name)
    pairs = results.read_results(run_folder, "pairs")
    summary = results.write_summary(run_folder, pairs)
    log.info("match: %d summary row(s) of run %r in %s", len(summary), ctx.options.run_name, run_folder / "summary.md")
    _warn_unconverged(pairs)
    if failures:
        lines = [
            f"{task.dataset} {task.setting.label} ({task.setting.key}) batch {task.batch}, pairs "
            f"{', '.join(task.pair_ids)}: {type(error).__name__}: {error}"
            for task, error in failures
        ]
        damaged = {task.dataset for task, error in failures if isinstance(error, CorruptFeaturesError)}
        lines += [_mark_damaged_features(plan) for plan in plans if plan.dataset in damaged]
        raise StageError(
            f"match: {len(failures)} of {len(tasks)} batch(es) failed twice; the others are stored and the next "
            "run computes only these:\n  " + "\n  ".join(lines)
        )


def _mark_damaged_features(plan: DatasetPlan) -> str:
    """Mark the plan's damaged feature shards for recomputation; returns the command that recomputes them."""
    shards = plan.store.verify()
    return (
        f"{plan.dataset}: feature shard(s) {shards} are damaged and now marked for recomputation: run "
        f"`pipeline run --stage features --stage match --dataset {plan.dataset} --backbone {plan.backbone}`"
    )


def _warn_unconverged(pairs: pd.DataFrame) -> None:
    """One warning per setting of the run's pairs table for its GWOT pairs that used every outer step."""
    unconverged = pairs[pairs["converged"].eq(False)].groupby("matcher_label").size()
    for label, count in unconverged.items():
        total = int((pairs["matcher_label"] == label).sum())
        log.warning(
            "match: %d of %d pair(s) of %s did not converge within outer_iters (the pairs table's converged "
            "column); raise outer_iters (--set NAME.outer_iters=...) or eps for smoother plans",
            count,
            total,
            label,
        )


def run(ctx: StageContext) -> None:
    """Match every selected dataset's test pairs under every selected setting; write parts and the summary."""
    match(ctx, PAIRS_PER_BATCH)


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
        plan = plan_dataset(replace(ctx, options=options), dataset, batch_size)
    except (StageError, CatalogError) as error:
        return StageStatus(0, None, str(error))
    ledger = _ledger(run_folder)
    tasks = plan.tasks(ctx.catalog, run_folder)
    done = sum(_is_done(ledger, task) for task in tasks)
    detail = f"run {ctx.options.run_name}: {len(plan.settings)} setting(s) x {len(plan.batches)} batch(es)"
    if options.categories or options.max_pairs is not None:
        detail += f" of {run_subset(replace(ctx, options=options)).text()}"
    return StageStatus(done, len(tasks), detail)


def _setting_key(config: dict[str, Any], matcher: str, run: str) -> str:
    """The key of the run's setting named ``matcher`` (a key, a label, or a matcher with one setting)."""
    settings = config.get("settings", {})
    exact = [key for key, s in settings.items() if matcher in (key, s["label"])]
    named = [key for key, s in settings.items() if s["name"] == matcher]
    found = exact or named
    if len(found) != 1:
        listing = ", ".join(f"{s['label']} ({key})" for key, s in sorted(settings.items())) or "none"
        problem = "matches several settings" if found else "is not a setting of the run"
        raise StageError(f"--matcher {matcher!r} {problem} {run!r}; pass a label or key of: {listing}")
    return found[0]


def export_tss(catalog: Catalog, run: str, matcher: str, out: str | Path, dataset: str | None = None) -> int:
    """Copy a setting's predicted TSS flows into ``out/<subset>/<pair>/flow1.flo, flow2.flo`` (the kit's
    layout); returns the number of pairs. ``matcher`` is a setting's label or key, or a matcher name that
    has one setting in the run; ``dataset`` is needed only when several datasets of the run have flows."""
    run_folder = results.run_dir(catalog.stores.outputs, run)
    config = results.read_run_config(run_folder)
    if not config:
        raise StageError(f"no run {run!r} in {run_folder}; run `pipeline run --stage match --run {run}` first")
    key = _setting_key(config, matcher, run)
    with_flows = [d for d in config.get("datasets", {}) if results.flows_dir(run_folder, d, key).is_dir()]
    if dataset is None and len(with_flows) != 1:
        raise StageError(
            f"run {run!r} has TSS flows of {key} for datasets {with_flows or 'none'}; pass --dataset NAME"
            if with_flows
            else f"run {run!r} has no TSS flows for setting {key}; match a TSS dataset with it first"
        )
    source = results.flows_dir(run_folder, dataset or with_flows[0], key)
    pair_dirs = sorted(p for p in source.glob("*/*") if p.is_dir())
    incomplete = [
        f"{p.parent.name}/{p.name}" for p in pair_dirs if not all((p / f"flow{n}.flo").is_file() for n in (1, 2))
    ]
    if incomplete or not pair_dirs:
        raise StageError(f"{source}: pairs lacking flow1.flo or flow2.flo: {incomplete or 'all'}; finish the match run")
    for pair_dir in pair_dirs:
        target = Path(out) / pair_dir.parent.name / pair_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for n in (1, 2):
            shutil.copyfile(pair_dir / f"flow{n}.flo", target / f"flow{n}.flo")
    return len(pair_dirs)


def default_tss_dir(catalog: Catalog) -> Path:
    """``<data_root>/raw/<first tss dataset>/TSS_CVPR2016``: the ground truth ``score-tss`` uses by default."""
    names = [name for name, spec in catalog.datasets.items() if spec.kind == "tss"]
    if not names:
        raise CatalogError(f"{catalog.path}: no dataset of kind tss; pass --dataset-dir TSS_CVPR2016_FOLDER")
    return catalog.raw_dir(names[0]) / TSS_ROOT


def _grey_mask(path: Path) -> np.ndarray:
    """A mask as OpenCV's IMREAD_GRAYSCALE renders it: palette colours through their luma (matches the kit)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def score_tss_folders(results_dir: str | Path, dataset_dir: str | Path) -> dict[str, TssScores]:
    """Score predictions in the kit's layout against the ground truth, per subset.

    ``results_dir`` holds subset folders (``FG3DCar``, ``JODS``, ``PASCAL``) of pair folders, each scored
    against ``dataset_dir/<subset>``; or it is one subset's folder of pair folders, scored against
    ``dataset_dir/<its name>`` when that exists, else against ``dataset_dir`` itself. SegIUR is scored where
    predicted masks (``mask1.png``, ``mask2.png``) exist.
    """
    results_dir, dataset_dir = Path(results_dir), Path(dataset_dir)
    subsets = sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name in TSS_SUBSETS)
    if subsets:
        return {p.name: score_tss_results(p, dataset_dir / p.name, read_mask=_grey_mask) for p in subsets}
    ground_truth = dataset_dir / results_dir.name if (dataset_dir / results_dir.name).is_dir() else dataset_dir
    return {results_dir.name: score_tss_results(results_dir, ground_truth, read_mask=_grey_mask)}
