"""Read matches out of a score matrix (NN similarity or transport plan): keypoint transfer and dense flow.

Scores are ``[N, M]`` over a source and a target patch grid laid on square canvases (see
:class:`stages.features.canvas.CanvasTransform`). A score row is turned into a target point by taking its
mode on the target grid and refining it with a soft-argmax over a ``window x window`` patch neighbourhood
of the mode: weights ``softmax(scores / temperature)`` for similarities, or the (non-negative) scores
themselves for transport plans (``temperature=None``). Points are the weighted mean of the target patch
centres, mapped back to original target pixels. A windowed :class:`stages.match.transport_plan.TransportPlan` is read
on its windows (O(N K) memory), with the same result as its dense array.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pipeline.errors import PipelineError
from stages.features.canvas import CanvasTransform
from stages.match.transport_plan import TransportPlan


def _as_plan(scores: torch.Tensor | TransportPlan) -> TransportPlan:
    """One pair's scores as a batch of one: a dense ``[N, M]`` array is wrapped as it is."""
    return scores if isinstance(scores, TransportPlan) else TransportPlan(scores[None])


def _check_scores(
    scores: TransportPlan,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    temperature: float | None,
    window: int,
) -> None:
    """Scores must be one pair's, for the two canvases' grids; plans (no temperature) must be non-negative,
    and windowed plans are read as plans."""
    expected = (1, src_transform.grid_size**2, trg_transform.grid_size**2)
    if tuple(scores.shape) != expected:
        got = list(scores.shape[1:]) if len(scores) == 1 else f"a batch of {len(scores)}"
        raise PipelineError(f"scores must be [N, M] = {list(expected[1:])} for these canvases, got {got}")
    if window < 1 or window % 2 == 0:
        raise PipelineError(f"window must be a positive odd number of patches, got {window}")
    if temperature is None and bool((scores.values < 0).any()):
        raise PipelineError(
            "scores have negative entries, so they are not a transport plan; pass a temperature "
            "(e.g. 0.02) to read similarities with a softmax"
        )
    if temperature is not None and scores.is_windowed:
        raise PipelineError("a windowed transport plan is read as a plan: pass no temperature")


def _blend(scores: TransportPlan, rows: torch.Tensor, blend: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Score rows blended from source rows ``rows [R, P]`` with weights ``blend [R, P]``, at target patches
    ``targets [R, J]``, ``[R, J]``."""
    values = torch.stack([scores.values_at(rows[:, p], targets) for p in range(rows.shape[1])], 1)  # [R, P, J]
    weights = blend.to(values)[:, :, None]
    # where(): a zero weight on a -inf (masked) similarity must not turn into NaN.
    return torch.where(weights > 0, weights * values, 0.0).sum(1)


def _soft_argmax(
    scores: TransportPlan,
    rows: torch.Tensor,
    blend: torch.Tensor,
    trg_transform: CanvasTransform,
    window: int,
    temperature: float | None,
) -> np.ndarray:
    """Canvas points ``[R, 2]`` (x, y) of the score rows blended from source rows ``rows [R, P]`` with
    weights ``blend [R, P]``: the mode refined in a window around it.

    The mode is the first target patch with the highest score, as ``argmax`` over the dense row would find:
    only the candidates (every target patch, or the rows' windows) are scored; a windowed plan's row with
    no mass in its windows is zero everywhere, so its mode is patch 0.
    """
    size = trg_transform.grid_size
    candidates = scores.candidates(rows)
    row_scores = _blend(scores, rows, blend, candidates)
    best = row_scores.amax(1, keepdim=True)
    mode = torch.where(row_scores == best, candidates, size * size).amin(1)
    if scores.is_windowed:
        mode = torch.where(best[:, 0] > 0, mode, 0)
    offsets = torch.arange(window, device=mode.device) - window // 2
    rows_at = (mode // size)[:, None, None] + offsets[None, :, None]  # [R, window, 1]
    cols_at = (mode % size)[:, None, None] + offsets[None, None, :]  # [R, 1, window]
    inside = ((rows_at >= 0) & (rows_at < size) & (cols_at >= 0) & (cols_at < size)).flatten(1)
    cells = (rows_at.clamp(0, size - 1) * size + cols_at.clamp(0, size - 1)).flatten(1)  # [R, window^2]
    near = _blend(scores, rows, blend, cells)
    if temperature is None:
        weights = near.clamp_min(0)
    else:
        weights = torch.exp((near - best) / temperature)
    weights = torch.where(inside, weights, 0.0).double()
    centres = torch.from_numpy(trg_transform.patch_centres().reshape(-1, 2)).to(mode.device)
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
    scores: torch.Tensor | TransportPlan,
    src_kps: np.ndarray,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    *,
    window: int = 3,
    temperature: float | None = None,
) -> np.ndarray:
    """Predict where source keypoints land in the target image.

    ``scores``: one pair's ``[N, M]`` array (a GWOT plan, or an NN similarity with a ``temperature``) or
    one-pair :class:`TransportPlan` (dense or windowed, read without densifying); ``src_kps [K, 2]`` (x, y)
    in original source pixels. Each keypoint's score row is the bilinear blend of the rows of its 4
    neighbouring source patches. Returns ``[K, 2]`` float64 in original target pixels.
    """
    scores = _as_plan(scores)
    _check_scores(scores, src_transform, trg_transform, temperature, window)
    src_kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
    index, weights = _bilinear_neighbours(src_transform.to_canvas(src_kps), src_transform)
    device = scores.values.device
    rows, blend = torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)
    return trg_transform.to_image(_soft_argmax(scores, rows, blend, trg_transform, window, temperature))


def dense_flow(
    scores: torch.Tensor | TransportPlan,
    src_transform: CanvasTransform,
    trg_transform: CanvasTransform,
    *,
    window: int = 3,
    temperature: float | None = None,
) -> np.ndarray:
    """Dense flow ``[H_src, W_src, 2]`` float32 with ``p_trg = p_src + flow[p_src]`` in original pixels.

    Every source patch is read out (see :func:`transfer_keypoints`, which takes the same ``scores``) into a
    displacement at its centre; padding patches copy their nearest valid patch, and the displacement field
    is interpolated bilinearly to every source pixel (constant beyond the outermost centres), so every
    pixel gets a finite flow.
    """
    scores = _as_plan(scores)
    _check_scores(scores, src_transform, trg_transform, temperature, window)
    size = src_transform.grid_size
    src_centres = src_transform.patch_centres().reshape(-1, 2)
    patches = torch.arange(size * size, device=scores.values.device)[:, None]
    canvas_points = _soft_argmax(scores, patches, torch.ones_like(patches), trg_transform, window, temperature)
    trg_points = trg_transform.to_image(canvas_points)
    displacement = (trg_points - src_transform.to_image(src_centres)).reshape(size, size, 2)
    _, nearest = ndimage.distance_transform_edt(~src_transform.valid_patches(), return_indices=True)
    displacement = displacement[nearest[0], nearest[1]]
    ys, xs = np.mgrid[0 : src_transform.height, 0 : src_transform.width]
    canvas = src_transform.to_canvas(np.stack([xs, ys], axis=-1).astype(np.float64))
    grid = (canvas - (src_transform.patch_size - 1) / 2) / src_transform.patch_size
    coords = [grid[..., 1], grid[..., 0]]
    flow = [ndimage.map_coordinates(displacement[..., c], coords, order=1, mode="nearest") for c in range(2)]
    return np.stack(flow, axis=-1).astype(np.float32)
