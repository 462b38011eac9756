"""Read matches out of a score matrix (NN similarity or transport plan): keypoint transfer and dense flow.

Scores are ``[N, M]`` over a source and a target patch grid laid on square canvases (see
:class:`stages.features.canvas.CanvasTransform`). A score row is turned into a target point by taking its
mode on the target grid and refining it with a soft-argmax over a ``window x window`` patch neighbourhood
of the mode: weights ``softmax(scores / temperature)`` for similarities, or the (non-negative) scores
themselves for transport plans (``temperature=None``). Points are the weighted mean of the target patch
centres, mapped back to original target pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pipeline.errors import PipelineError
from stages.features.canvas import CanvasTransform


def _check_scores(
    scores: torch.Tensor,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    temperature: float | None,
    window: int,
) -> None:
    """Scores must be ``[N, M]`` for the two canvases' grids; plans (no temperature) must be non-negative."""
    expected = (src_transform.grid_size**2, trg_transform.grid_size**2)
    if tuple(scores.shape) != expected:
        raise PipelineError(f"scores must be [N, M] = {list(expected)} for these canvases, got {list(scores.shape)}")
    if window < 1 or window % 2 == 0:
        raise PipelineError(f"window must be a positive odd number of patches, got {window}")
    if temperature is None and bool((scores < 0).any()):
        raise PipelineError(
            "scores have negative entries, so they are not a transport plan; pass a temperature "
            "(e.g. 0.02) to read similarities with a softmax"
        )


def _soft_argmax(
    rows: torch.Tensor, trg_transform: CanvasTransform, window: int, temperature: float | None
) -> np.ndarray:
    """Canvas points ``[R, 2]`` (x, y) of score rows ``[R, M]``: the mode refined in a window around it."""
    size = trg_transform.grid_size
    mode = rows.argmax(1)
    offsets = torch.arange(window, device=rows.device) - window // 2
    rows_at = (mode // size)[:, None, None] + offsets[None, :, None]  # [R, window, 1]
    cols_at = (mode % size)[:, None, None] + offsets[None, None, :]  # [R, 1, window]
    inside = ((rows_at >= 0) & (rows_at < size) & (cols_at >= 0) & (cols_at < size)).flatten(1)
    cells = (rows_at.clamp(0, size - 1) * size + cols_at.clamp(0, size - 1)).flatten(1)  # [R, window^2]
    scores = rows.gather(1, cells)
    if temperature is None:
        weights = scores.clamp_min(0)
    else:
        weights = torch.exp((scores - rows.gather(1, mode[:, None])) / temperature)
    weights = torch.where(inside, weights, 0.0).double()
    centres = torch.from_numpy(trg_transform.patch_centres().reshape(-1, 2)).to(rows.device)
    total = weights.sum(1, keepdim=True)
    # A row with no mass near its mode (e.g. a source patch the unbalanced plan left empty) keeps the mode.
    mean = (weights[:, :, None] * centres[cells]).sum(1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    points = torch.where(total > 0, mean, centres[mode])
    return points.cpu().numpy()


def _bilinear_neighbours(canvas_points: np.ndarray, transform: CanvasTransform) -> tuple[np.ndarray, np.ndarray]:
    """The 4 source patches around each canvas point and their bilinear weights, ``[K, 4]`` each.

    Points beyond the outermost patch centres take the border patches' values; invalid (padding) patches
    get no weight, and a point whose 4 patches are all invalid takes the nearest valid patch.
    """
    size, p = transform.grid_size, transform.patch_size
    grid = (canvas_points - (p - 1) / 2) / p  # patch-grid coordinates (x, y)
    low = np.clip(np.floor(grid), 0, max(size - 2, 0)).astype(np.int64)
    frac = np.clip(grid - low, 0.0, 1.0)
    high = np.minimum(low + 1, size - 1)
    cols = np.stack([low[:, 0], high[:, 0], low[:, 0], high[:, 0]], 1)
    rows = np.stack([low[:, 1], low[:, 1], high[:, 1], high[:, 1]], 1)
    wx = np.stack([1 - frac[:, 0], frac[:, 0]], 1)[:, [0, 1, 0, 1]]
    wy = np.stack([1 - frac[:, 1], frac[:, 1]], 1)[:, [0, 0, 1, 1]]
    weights = wx * wy * transform.valid_patches()[rows, cols]
    index = rows * size + cols
    orphans = weights.sum(1) <= 0
    if orphans.any():
        valid_centres = transform.patch_centres()[transform.valid_patches()]
        nearest = np.argmin(((canvas_points[orphans, None, :] - valid_centres[None]) ** 2).sum(-1), axis=1)
        valid_index = np.flatnonzero(transform.valid_patches())
        index[orphans, 0], weights[orphans] = valid_index[nearest], np.eye(4)[0]
    return index, weights / weights.sum(1, keepdims=True)


def transfer_keypoints(
    scores: torch.Tensor,
    src_kps: np.ndarray,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    *,
    window: int = 3,
    temperature: float | None = None,
) -> np.ndarray:
    """Predict where source keypoints land in the target image.

    ``scores [N, M]`` for one pair (a GWOT plan, or an NN similarity with a ``temperature``); ``src_kps
    [K, 2]`` (x, y) in original source pixels. Each keypoint's score row is the bilinear blend of the rows
    of its 4 neighbouring source patches. Returns ``[K, 2]`` float64 in original target pixels.
    """
    _check_scores(scores, src_transform, trg_transform, temperature, window)
    src_kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
    index, weights = _bilinear_neighbours(src_transform.to_canvas(src_kps), src_transform)
    neighbour_rows = scores[torch.from_numpy(index).to(scores.device)]  # [K, 4, M]
    blend = torch.from_numpy(weights).to(neighbour_rows)[:, :, None]
    # where(): a zero weight on a -inf (masked) similarity must not turn into NaN.
    rows = torch.where(blend > 0, blend * neighbour_rows, 0.0).sum(1)
    return trg_transform.to_image(_soft_argmax(rows, trg_transform, window, temperature))


def dense_flow(
    scores: torch.Tensor,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    *,
    window: int = 3,
    temperature: float | None = None,
) -> np.ndarray:
    """Dense flow ``[H_src, W_src, 2]`` float32 with ``p_trg = p_src + flow[p_src]`` in original pixels.

    Every source patch is read out (see :func:`transfer_keypoints`) into a displacement at its centre;
    padding patches copy their nearest valid patch, and the displacement field is interpolated bilinearly
    to every source pixel (constant beyond the outermost centres), so every pixel gets a finite flow.
    """
    _check_scores(scores, src_transform, trg_transform, temperature, window)
    size = src_transform.grid_size
    src_centres = src_transform.patch_centres().reshape(-1, 2)
    trg_points = trg_transform.to_image(_soft_argmax(scores, trg_transform, window, temperature))
    displacement = (trg_points - src_transform.to_image(src_centres)).reshape(size, size, 2)
    _, nearest = ndimage.distance_transform_edt(~src_transform.valid_patches(), return_indices=True)
    displacement = displacement[nearest[0], nearest[1]]
    ys, xs = np.mgrid[0 : src_transform.height, 0 : src_transform.width]
    canvas = src_transform.to_canvas(np.stack([xs, ys], axis=-1).astype(np.float64))
    grid = (canvas - (src_transform.patch_size - 1) / 2) / src_transform.patch_size
    coords = [grid[..., 1], grid[..., 0]]
    flow = [ndimage.map_coordinates(displacement[..., c], coords, order=1, mode="nearest") for c in range(2)]
    return np.stack(flow, axis=-1).astype(np.float32)
