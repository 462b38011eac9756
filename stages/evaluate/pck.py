"""PCK for transferred keypoints: thresholds of each benchmark, per-pair correctness, both averages.

All coordinates and thresholds are in original target-image pixels. A keypoint is correct when its
Euclidean error is ``<=`` the threshold (the benchmarks' comparison). Two averages over pairs exist in the
literature and move results by points, so both are always computed and labelled:

- per image: the mean over pairs of each pair's fraction of correct keypoints (GeoAware-SC, DIFT);
- per keypoint: correct keypoints of all pairs pooled, divided by all keypoints (SD+DINO).

Typical use for one pair at alphas ``[A]``::

    thresholds = np.asarray(alphas) * reference_length("trg_bbox", trg_bbox=bbox)  # [A]
    correct = correct_keypoints(keypoint_errors(pred_kps, trg_kps), thresholds)    # [A, K]
    counts, n_kps = correct.sum(axis=-1), correct.shape[-1]                         # keep per pair

and over pairs :func:`stages.evaluate.summary.pck_table` (from the pairs table's ``n_correct`` and ``n_kps``).
"""

from __future__ import annotations

import numpy as np

# Threshold kinds of the PCK protocols (DATASETS.md): kind -> the length alpha multiplies
THRESHOLD_KINDS = {
    "trg_bbox": "max(w, h) of the target bbox",  # SPair-71k
    "trg_image": "max(W, H) of the target image",  # PF-PASCAL, TSS, demo
    "trg_kps": "the larger extent of the target keypoints",  # PF-WILLOW
}


def reference_length(
    kind: str,
    *,
    trg_image_size: tuple[int, int] | None = None,
    trg_bbox: np.ndarray | list[float] | None = None,
    trg_kps: np.ndarray | list[list[float]] | None = None,
) -> float:
    """The length that alpha multiplies, in target pixels, for a threshold ``kind``.

    ``trg_bbox``: max(w, h) of the target bbox [x1, y1, x2, y2] (SPair-71k); ``trg_image``: max(W, H) of
    the target image given as ``trg_image_size`` (W, H) (PF-PASCAL); ``trg_kps``: the larger extent of the
    target keypoints [K, 2], max(max x - min x, max y - min y) (PF-WILLOW).
    """
    if kind == "trg_bbox":
        x1, y1, x2, y2 = _require(kind, "trg_bbox", trg_bbox, (4,))
        length = max(x2 - x1, y2 - y1)
    elif kind == "trg_image":
        width, height = _require(kind, "trg_image_size", trg_image_size, (2,))
        length = max(width, height)
    elif kind == "trg_kps":
        kps = _require(kind, "trg_kps", trg_kps, (-1, 2))
        if len(kps) == 0:
            raise ValueError("threshold kind 'trg_kps' needs at least one target keypoint, got none")
        extent = kps.max(axis=0) - kps.min(axis=0)
        length = max(extent[0], extent[1])
    else:
        raise ValueError(f"unknown PCK threshold kind {kind!r}; expected one of {', '.join(THRESHOLD_KINDS)}")
    if not length > 0:
        raise ValueError(f"threshold kind {kind!r} gives a non-positive reference length {length}")
    return float(length)


def _require(kind: str, name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as a finite float array of ``shape`` (-1: any length); ValueError naming what is missing."""
    if value is None:
        raise ValueError(f"threshold kind {kind!r} needs {name}, which was not given")
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape, strict=True)):
        raise ValueError(f"{name} must have shape {list(shape)} (-1: any), got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values: {array.tolist()}")
    return array


def keypoint_errors(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[K] Euclidean distances between predicted and true keypoints, both [K, 2] (x, y)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != 2:
        raise ValueError(f"expected two [K, 2] keypoint arrays, got {list(pred.shape)} and {list(true.shape)}")
    return np.linalg.norm(pred - true, axis=1)


def correct_keypoints(errors: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Bool ``errors <= threshold``: [K] for a scalar threshold, [A, K] for thresholds [A]."""
    errors = np.asarray(errors, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return errors <= thresholds[..., None]


def pck_per_pair(errors: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Fraction of a pair's keypoints that are correct: [] for a scalar threshold, [A] for [A].

    A pair without keypoints has no PCK: the result is NaN (the averages over pairs leave such pairs out).
    """
    correct = correct_keypoints(errors, thresholds)
    if correct.shape[-1] == 0:
        return np.full(correct.shape[:-1], np.nan)
    return correct.mean(axis=-1)
