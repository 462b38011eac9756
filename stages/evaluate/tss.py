"""The TSS dense-flow protocol, reproducing the official evaluation tool's ``scores.csv`` exactly.

The official tool (Taniai et al., CVPR 2016) is C++ on OpenCV. Its choices, all reproduced here:

- Predicted flows not at the ground-truth size are resized with ``cv::resize(..., INTER_LINEAR)``:
  bilinear with pixel-centre alignment (source x = (x + 0.5) * w_old / w_new - 0.5, clamped to the
  image), no antialiasing, computed in float32 (horizontal pass, then vertical). Then
  u' = (u + x * w_old / w_new) * w2_new / w2_old - x (v likewise with heights), in float32. Any pixel
  where the same bilinear resize of the 0/1 validity mask is not exactly 1.0 becomes unknown (1e10).
  Checked on the kit's JODS sample: this gives every T1..T50 value to within the csv's rounding (5e-7);
  the same in float64 misses one value by 3.6e-5 (one pixel), a Gaussian-antialiased resize
  (scikit-image) by 6.7e-5 and a triangle-antialiased one (MATLAB ``imresize``, PIL) by 2.8e-3.
- Endpoint errors are float32; err = 1000 where exactly one of prediction and ground truth is known.
- Accuracy at threshold t = 1 - #{p known in GT : err(p) > t} / #{p known in GT}, t = T/100 *
  max(H, W) of the image the flow points into, T = 1..50.
- SegIUR is the IoU of predicted and ground-truth foreground masks; a predicted mask at another size is
  resized with OpenCV's 8-bit fixed-point bilinear resize and thresholded at > 128.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from stages.datasets.flo import UNKNOWN_FLOW, flow_validity, read_flip, read_flo

THRESHOLDS_PERCENT = np.arange(1, 51)  # the kit's T1..T50, in % of the larger side of the image flowed into
MISMATCH_ERROR = 1000.0  # the kit's error where exactly one of prediction and ground truth is known
MASK_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE for 8-bit images

Size = tuple[int, int]  # (width, height)


def _linear_taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps along one axis: source indices i0, i1 [n_dst] and float32 weights w0, w1."""
    scale = 1.0 / (n_dst / n_src)  # OpenCV stores the inverse scale and inverts it
    position = ((np.arange(n_dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(position).astype(np.int64)
    w1 = position - i0.astype(np.float32)
    before, after = i0 < 0, i0 >= n_src - 1
    w1[before | after] = 0
    i0[before] = 0
    i0[after] = n_src - 1
    return i0, np.minimum(i0 + 1, n_src - 1), np.float32(1) - w1, w1


def _resize_bilinear(array: np.ndarray, size: Size) -> np.ndarray:
    """[h, w, C] float32 -> [H, W, C] float32, as ``cv::resize(INTER_LINEAR)`` computes it in float32."""
    height, width = array.shape[:2]
    x0, x1, wx0, wx1 = _linear_taps(width, size[0])
    y0, y1, wy0, wy1 = _linear_taps(height, size[1])
    rows = array[:, x0] * wx0[:, None] + array[:, x1] * wx1[:, None]
    return rows[y0] * wy0[:, None, None] + rows[y1] * wy1[:, None, None]


def resize_flow(flow: np.ndarray, new_size: Size, other_old_size: Size, other_new_size: Size) -> np.ndarray:
    """Resize a flow [h, w, 2] into another image to [H, W, 2] float32, as the TSS kit does.

    ``new_size`` is this image's new (W, H); ``other_old_size`` and ``other_new_size`` are the (W, H) of
    the image the flow points into, as the flow was computed and as wanted. Vectors become
    u' = (u + x * w_old / w_new) * w2_new / w2_old - x (v likewise), x the new pixel's column; pixels
    whose bilinear footprint touches an unknown vector become unknown (1e10).
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"expected an [H, W, 2] flow, got shape {list(flow.shape)}")
    old_height, old_width = flow.shape[:2]
    new_width, new_height = new_size
    valid = _resize_bilinear(flow_validity(flow).astype(np.float32)[..., None], new_size)[..., 0] == 1
    resized = _resize_bilinear(flow, new_size)
    columns, rows = np.meshgrid(np.arange(new_width, dtype=np.float32), np.arange(new_height, dtype=np.float32))
    new_grid = np.stack([columns, rows], axis=-1)
    old_grid = new_grid * np.array([old_width / new_width, old_height / new_height], dtype=np.float32)
    other_scale = np.array(
        [other_new_size[0] / other_old_size[0], other_new_size[1] / other_old_size[1]], dtype=np.float32
    )
    resized = (resized + old_grid) * other_scale - new_grid
    resized[~valid] = UNKNOWN_FLOW
    return resized


def endpoint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[H, W] float32 endpoint errors of flows [H, W, 2]; 1000 where only one of the two is known.

    Where both are unknown the error is 0 (such pixels are never scored: only known GT pixels count).
    """
    pred = np.asarray(pred, dtype=np.float32)
    gt = np.asarray(gt, dtype=np.float32)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2:
        raise ValueError(f"expected two [H, W, 2] flows of one size, got {list(pred.shape)} and {list(gt.shape)}")
    pred_valid, gt_valid = flow_validity(pred), flow_validity(gt)
    difference = np.where((pred_valid & gt_valid)[..., None], pred - gt, np.float32(0))
    errors = np.sqrt(difference[..., 0] * difference[..., 0] + difference[..., 1] * difference[..., 1])
    errors[pred_valid != gt_valid] = MISMATCH_ERROR
    return errors


def flow_accuracy(pred: np.ndarray, gt: np.ndarray, threshold_px: float | np.ndarray) -> float | np.ndarray:
    """Fraction of known GT pixels whose error is not above the threshold: float, or [T] for thresholds [T].

    pred, gt: [H, W, 2] flows on the same grid. NaN when the ground truth has no known pixel.
    """
    gt_valid = flow_validity(np.asarray(gt))
    errors = endpoint_errors(pred, gt)[gt_valid]
    # OpenCV compares a float32 matrix with a scalar converted to float32
    thresholds = np.asarray(threshold_px, dtype=np.float32)
    n_valid = errors.size
    if n_valid == 0:
        return np.full(thresholds.shape, np.nan) if thresholds.ndim else float("nan")
    wrong = (errors > thresholds[..., None]).sum(axis=-1)
    accuracy = 1.0 - wrong / n_valid
    return accuracy if thresholds.ndim else float(accuracy)


def score_direction(
    pred_flow: np.ndarray, gt_flow: np.ndarray, trg_size: Size, *, pred_trg_size: Size | None = None
) -> np.ndarray:
    """[50] accuracies at T = 1..50 of a flow into the target image (thresholds T/100 * max(H, W)).

    pred_flow: [h, w, 2] on the source grid as predicted; gt_flow: [H, W, 2]. ``trg_size`` is the
    target's (W, H) as in the ground truth and ``pred_trg_size`` as the prediction saw it (default: the
    same). When either size differs, the prediction is first resized with ``resize_flow``.
    """
    pred_flow = np.asarray(pred_flow, dtype=np.float32)
    gt_height, gt_width = gt_flow.shape[:2]
    pred_trg_size = trg_size if pred_trg_size is None else pred_trg_size
    if pred_flow.shape[:2] != (gt_height, gt_width) or tuple(pred_trg_size) != tuple(trg_size):
        pred_flow = resize_flow(pred_flow, (gt_width, gt_height), pred_trg_size, trg_size)
    thresholds = THRESHOLDS_PERCENT / 100 * max(trg_size)
    return np.asarray(flow_accuracy(pred_flow, gt_flow, thresholds))


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """[h, w] 8-bit mask -> [H, W] bool, as the kit: OpenCV's fixed-point bilinear resize, then > 128.

    Reproduces the vectorised (SIMD) rounding of OpenCV's vertical pass, which the kit's SegIUR shows.
    """
    mask = np.asarray(mask).astype(np.int64)
    height, width = mask.shape
    x0, x1, wx0, wx1 = _linear_taps(width, size[0])
    y0, y1, wy0, wy1 = _linear_taps(height, size[1])
    ix0, ix1, iy0, iy1 = (np.round(w * MASK_COEF_SCALE).astype(np.int64) for w in (wx0, wx1, wy0, wy1))
    rows = mask[:, x0] * ix0 + mask[:, x1] * ix1
    top = ((rows[y0] >> 4) * iy0[:, None]) >> 16
    bottom = ((rows[y1] >> 4) * iy1[:, None]) >> 16
    return ((top + bottom + 2) >> 2) > 128


def segmentation_iou(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Intersection over union of two [H, W] foreground masks (nonzero = foreground): the kit's SegIUR."""
    pred_mask, gt_mask = np.asarray(pred_mask) != 0, np.asarray(gt_mask) != 0
    union = np.count_nonzero(pred_mask | gt_mask)
    return np.count_nonzero(pred_mask & gt_mask) / union if union else float("nan")


@dataclass(frozen=True)
class TssScores:
    """Scores of a results folder: one row per pair and direction, plus the averages the kit reports."""

    pairs: tuple[str, ...]  # [R] pair folder names (each appears twice: image1 -> image2, then 2 -> 1)
    directions: tuple[str, ...]  # [R] "1to2" or "2to1"
    src_names: tuple[str, ...]  # [R] original file names from pair.txt
    trg_names: tuple[str, ...]
    flip: np.ndarray  # [R] bool, the pair's flip_gt
    accuracy: np.ndarray  # [R, 50] accuracies at T1..T50
    seg_iou: np.ndarray  # [R] SegIUR, NaN when masks were not scored
    average: np.ndarray  # [50] mean over all directions
    average_no_flip: np.ndarray  # [50] mean over the directions of pairs with flip_gt 0 (NaN if none)

    def rows(self) -> list[dict[str, object]]:
        """The table as the kit's ``scores.csv`` lays it out: Row, Src, Ref, SegIUR, Flip, T1..T50."""
        table = [
            self._row(f"{pair}_{direction}", src, trg, seg, int(flip), accuracy)
            for pair, direction, src, trg, seg, flip, accuracy in zip(
                self.pairs,
                self.directions,
                self.src_names,
                self.trg_names,
                self.seg_iou,
                self.flip,
                self.accuracy,
                strict=True,
            )
        ]
        table.append(self._row("Average", "-", "-", _mean(self.seg_iou), 1, self.average))
        table.append(self._row("w/o flip", "-", "-", _mean(self.seg_iou[~self.flip]), 0, self.average_no_flip))
        return table

    @staticmethod
    def _row(name: str, src: str, trg: str, seg: float, flip: int, accuracy: np.ndarray) -> dict[str, object]:
        row: dict[str, object] = {"Row": name, "Src": src, "Ref": trg, "SegIUR": float(seg), "Flip": flip}
        row.update({f"T{t}": float(a) for t, a in zip(THRESHOLDS_PERCENT, accuracy, strict=True)})
        return row


def _mean(values: np.ndarray) -> np.ndarray | float:
    """Mean over the first axis; NaN (of the right shape) when there is nothing to average."""
    return values.mean(axis=0) if len(values) else np.full(values.shape[1:], np.nan)


def _read_pair_names(path: Path) -> tuple[str, str]:
    """The original (image1, image2) file names from a pair's pair.txt."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(path, "pair.txt is missing") from None
    names = lines[1].split(",") if len(lines) >= 2 else []
    if len(names) != 2:
        raise DataError(path, "expected a header line and a line 'image1_name,image2_name'")
    return names[0].strip(), names[1].strip()


def _direction_seg_iou(read_mask: Callable[[Path], np.ndarray] | None, pred_path: Path, gt_path: Path) -> float:
    """SegIUR of one direction; NaN without a mask reader or without a predicted mask."""
    if read_mask is None or not pred_path.is_file():
        return float("nan")
    if not gt_path.is_file():
        raise DataError(gt_path, "ground-truth mask is missing")
    pred_mask, gt_mask = read_mask(pred_path), read_mask(gt_path)
    if pred_mask.shape != gt_mask.shape:
        pred_mask = resize_mask(pred_mask, (gt_mask.shape[1], gt_mask.shape[0]))
    return segmentation_iou(pred_mask, gt_mask)


def score_tss_results(
    results_dir: str | Path,
    dataset_dir: str | Path,
    *,
    read_mask: Callable[[Path], np.ndarray] | None = None,
) -> TssScores:
    """Score every pair folder of ``results_dir`` (flow1.flo, flow2.flo) against ``dataset_dir``'s.

    Both directions of each pair are scored; flow2's prediction size gives image2's size as the
    prediction saw it (and flow1's image1's), as in the kit. ``read_mask`` (path -> [H, W] uint8, the
    8-bit grayscale rendering as OpenCV's IMREAD_GRAYSCALE gives it) turns on SegIUR from the optional
    mask1.png/mask2.png of the results; without it SegIUR is NaN. Missing or malformed files raise
    DataError naming the file.
    """
    results_dir, dataset_dir = Path(results_dir), Path(dataset_dir)
    pair_dirs = sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []
    if not pair_dirs:
        raise DataError(results_dir, "no pair folders to score (expected <pair>/flow1.flo and flow2.flo)")
    pairs, directions, src_names, trg_names, flips, accuracies, seg_ious = ([] for _ in range(7))
    for pred_dir in pair_dirs:
        gt_dir = dataset_dir / pred_dir.name
        pred_flows = [read_flo(pred_dir / "flow1.flo"), read_flo(pred_dir / "flow2.flo")]
        gt_flows = [read_flo(gt_dir / "flow1.flo"), read_flo(gt_dir / "flow2.flo")]
        flip = read_flip(gt_dir / "flip_gt.txt")
        names = _read_pair_names(gt_dir / "pair.txt")
        for src, trg in ((0, 1), (1, 0)):
            trg_size = (gt_flows[trg].shape[1], gt_flows[trg].shape[0])
            pred_trg_size = (pred_flows[trg].shape[1], pred_flows[trg].shape[0])
            accuracies.append(score_direction(pred_flows[src], gt_flows[src], trg_size, pred_trg_size=pred_trg_size))
            mask_name = f"mask{src + 1}.png"
            seg_ious.append(_direction_seg_iou(read_mask, pred_dir / mask_name, gt_dir / mask_name))
            pairs.append(pred_dir.name)
            directions.append(f"{src + 1}to{trg + 1}")
            src_names.append(names[src])
            trg_names.append(names[trg])
            flips.append(flip)
    accuracy, flip_array = np.stack(accuracies), np.array(flips, dtype=bool)
    return TssScores(
        pairs=tuple(pairs),
        directions=tuple(directions),
        src_names=tuple(src_names),
        trg_names=tuple(trg_names),
        flip=flip_array,
        accuracy=accuracy,
        seg_iou=np.array(seg_ious, dtype=np.float64),
        average=_mean(accuracy),
        average_no_flip=_mean(accuracy[~flip_array]),
    )
