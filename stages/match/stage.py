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

Batches are deterministic, so reruns, resumes and any number of workers agree. The driver's side that reads no
tensors (pairs, batches, the ledger, batches reused from other runs, the stage's status) is
:mod:`stages.match.plan`; this module is the workers' side and the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from distributed import Client

from pipeline import results
from pipeline.cache import atomic_path
from pipeline.cluster import TaskFailure, dask_client, run_tasks
from pipeline.context import StageContext
from pipeline.errors import PipelineError, StageError
from pipeline.features_store import CorruptFeaturesError, FeatureStore
from pipeline.provenance import provenance
from stages.datasets.flo import read_flo, write_flo
from stages.evaluate.pck import correct_keypoints, keypoint_errors, pck_per_pair, reference_length
from stages.evaluate.summary import summarize, summary_markdown
from stages.evaluate.tss import score_direction
from stages.features.canvas import CanvasTransform
from stages.match import dense_flow, nn_match, transfer_keypoints
from stages.match.plan import (
    PAIRS_PER_BATCH,
    SPLIT,
    BatchTask,
    DatasetPlan,
    drop_stale_batches,
    is_done,
    ledger_record,
    plan_dataset,
    reuse_finished,
    run_ledger,
    run_subset,
)
from stages.match.plan import status as status  # the stage's status (registered from plan: no torch to import)
from stages.match.robust import robust_gwot
from stages.match.settings import MatcherSetting, NNParams
from stages.match.subsets import check_run_subset
from stages.match.transport_plan import TransportPlan

log = logging.getLogger(__name__)


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
        folder = results.flows_dir(task.run_folder, task.dataset, task.matcher, task.setting.key)
        # TSS directions are named <src image number>to<trg image number>; flow1 starts from image1.
        with atomic_path(folder / pair["group"] / f"flow{pair['direction'][0]}.flo") as tmp:
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
    record = provenance(device_name(device))
    results.write_part(task.part_path("keypoints"), keypoint_rows, results.KEYPOINTS_SCHEMA, record)
    results.write_part(task.part_path("pairs"), pair_rows, results.PAIRS_SCHEMA, record)
    run_ledger(task.run_folder).mark_done(task.unit, ledger_record(task))
    return len(task.pairs)


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda (<GPU model>)``: the device a provenance record names."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _record_config(ctx: StageContext, run_folder: Path, plans: Sequence[DatasetPlan], batch_size: int) -> None:
    settings = {}  # each with the label its parts are filed under in the run
    for plan in plans:
        labels = plan.filed_labels(run_folder)
        settings.update({s.key: {**s.describe(), "label": labels[s.key]} for s in plan.settings})
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
            "settings": settings,
            "provenance": provenance(device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))),
        },
    )


def _run_tasks(client: Client, tasks: Sequence[BatchTask], progress: bool) -> list[TaskFailure]:
    """Run every batch on the cluster (one retry each); returns the batches that failed twice."""
    total = sum(len(task.pairs) for task in tasks)
    return run_tasks(client, match_batch, tasks, total=total, desc="match", unit="pair", progress=progress)


def match(ctx: StageContext, batch_size: int) -> None:
    """The stage's work in batches of ``batch_size`` pairs (``run`` uses ``PAIRS_PER_BATCH``)."""
    run_folder = results.run_dir(ctx.catalog.stores.outputs, ctx.options.run_name)
    results.check_layout(run_folder)
    plans = [plan_dataset(ctx, dataset, batch_size) for dataset in ctx.datasets]
    config = results.read_run_config(run_folder)
    for plan in plans:
        check_run_subset(config, plan.dataset, run_subset(ctx), ctx.options.run_name)
    _record_config(ctx, run_folder, plans, batch_size)
    ledger = run_ledger(run_folder)
    tasks = []
    for plan in plans:
        drop_stale_batches(run_folder, plan)
        tasks += [
            task for task in plan.tasks(ctx.catalog, run_folder) if ctx.options.force or not is_done(ledger, task)
        ]
    if not ctx.options.force:
        tasks = reuse_finished(ledger, tasks)
    # Markers stay until each batch's new parts replace the old ones: a forced run that stops keeps results.
    failures = []
    if tasks:
        log.info("match: %d batch(es) of %d pair(s) to compute", len(tasks), sum(len(t.pairs) for t in tasks))
        with dask_client(ctx.catalog.cluster, ctx.options.scheduler) as client:
            failures = _run_tasks(client, tasks, ctx.options.progress)
    else:
        log.info("match: every batch of run %r is already done", ctx.options.run_name)
    pairs = results.read_results(run_folder, "pairs")
    summary = summarize(pairs)
    results.write_summary(run_folder, summary, summary_markdown(summary))
    log.info("match: %d summary row(s) of run %r in %s", len(summary), ctx.options.run_name, run_folder / "summary.md")
    _warn_unconverged(pairs)
    if failures:
        lines = [
            f"{task.dataset} {task.matcher} ({task.setting.key}) batch {task.batch}, pairs "
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
    unconverged = pairs[pairs["converged"].eq(False)].groupby("matcher").size()
    for label, count in unconverged.items():
        total = int((pairs["matcher"] == label).sum())
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
