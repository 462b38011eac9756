"""Keypoint transfer and dense flow: exact on permutation plans, sub-patch accurate, in original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from stages.features.canvas import CanvasTransform
from stages.match.readout import dense_flow, transfer_keypoints

SRC = CanvasTransform.fit(width=150, height=100, canvas_size=112, patch_size=14)  # landscape: top/bottom pad
TRG = CanvasTransform.fit(width=90, height=130, canvas_size=112, patch_size=14)  # portrait: left/right pad


def valid_centres(transform: CanvasTransform) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and canvas centres [V, 2] of the transform's valid patches."""
    valid = transform.valid_patches().flatten()
    return np.flatnonzero(valid), transform.patch_centres().reshape(-1, 2)[valid]


def test_canvas_round_trips_are_exact_for_padded_non_square_images():
    assert SRC.pad_top > 0 and SRC.pad_left == 0 and TRG.pad_left > 0 and TRG.pad_top == 0
    points = np.random.default_rng(0).uniform([-0.5, -0.5], [149.5, 99.5], size=(50, 2))
    np.testing.assert_allclose(SRC.to_image(SRC.to_canvas(points)), points, rtol=0, atol=1e-12)
    centres = TRG.patch_centres().reshape(-1, 2)
    np.testing.assert_allclose(TRG.to_canvas(TRG.to_image(centres)), centres, rtol=0, atol=1e-12)


def test_permutation_plan_transfers_patch_centres_exactly():
    size = SRC.grid_size**2
    permutation = np.random.default_rng(1).permutation(size)
    plan = torch.zeros(size, size, dtype=torch.float64)
    plan[np.arange(size), permutation] = 1 / size
    indices, centres = valid_centres(SRC)
    keypoints = SRC.to_image(centres)
    expected = TRG.to_image(TRG.patch_centres().reshape(-1, 2)[permutation[indices]])
    np.testing.assert_allclose(transfer_keypoints(plan, keypoints, SRC, TRG), expected, rtol=0, atol=1e-9)
    # The same match as a similarity (1 on the match, -1 elsewhere) read with a sharp softmax.
    similarity = 2 * plan * size - 1
    predicted = transfer_keypoints(similarity, keypoints, SRC, TRG, temperature=0.01)
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-9)


def test_identity_plan_sends_every_point_between_centres_to_itself():
    # Bilinear blending of one-hot rows is linear in the point, and so is the readout inside the valid area.
    size = SRC.grid_size**2
    plan = torch.eye(size, dtype=torch.float64) / size
    _, centres = valid_centres(SRC)
    low, high = centres.min(0), centres.max(0)
    canvas_points = np.random.default_rng(2).uniform(low, high, size=(20, 2))
    keypoints = SRC.to_image(canvas_points)
    np.testing.assert_allclose(transfer_keypoints(plan, keypoints, SRC, SRC), keypoints, rtol=0, atol=1e-9)


@pytest.mark.parametrize("temperature", [None, 0.05])
def test_soft_argmax_recovers_a_peak_between_patch_centres(temperature):
    p = TRG.patch_size
    peak = TRG.patch_centres()[3, 4] + np.array([0.3, -0.35]) * p  # canvas point between centres
    centres = torch.from_numpy(TRG.patch_centres().reshape(-1, 2))
    log_gaussian = -((centres - torch.from_numpy(peak)) ** 2).sum(1) / (2 * (0.5 * p) ** 2)
    row = log_gaussian.exp() if temperature is None else temperature * log_gaussian
    scores = row[None].repeat(SRC.grid_size**2, 1)
    predicted = transfer_keypoints(scores, np.array([[75.0, 50.0]]), SRC, TRG, temperature=temperature)
    error = np.linalg.norm(TRG.to_canvas(predicted)[0] - peak)
    mode_error = np.linalg.norm(TRG.patch_centres()[3, 4] - peak)
    assert error < 0.1 * p and error < mode_error / 4


def test_corner_keypoints_on_masked_similarities_stay_finite_and_inside():
    generator = torch.Generator().manual_seed(3)
    similarity = torch.rand(SRC.grid_size**2, TRG.grid_size**2, generator=generator) * 2 - 1
    similarity[:, ~TRG.valid_patches().flatten()] = -torch.inf
    corners = np.array([[0.0, 0.0], [149.0, 0.0], [0.0, 99.0], [149.0, 99.0]])
    predicted = transfer_keypoints(similarity, corners, SRC, TRG, temperature=0.05)
    assert np.isfinite(predicted).all()
    assert (predicted >= -0.5).all() and (predicted <= [89.5, 129.5]).all()


def test_dense_flow_of_a_one_patch_shift_is_the_shift_in_original_pixels():
    size = SRC.grid_size
    rows, cols = np.divmod(np.arange(size * size), size)
    shifted = rows * size + np.minimum(cols + 1, size - 1)
    plan = torch.zeros(size * size, size * size)
    plan[np.arange(size * size), shifted] = 1.0
    flow = dense_flow(plan, SRC, SRC)
    assert flow.shape == (SRC.height, SRC.width, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
    xs = np.arange(SRC.width)
    inner = SRC.to_canvas(np.stack([xs, np.zeros_like(xs)], 1))[:, 0] <= SRC.patch_centres()[0, size - 2, 0]
    np.testing.assert_allclose(flow[:, inner, 0], SRC.patch_size / SRC.scale_x, rtol=1e-5)
    np.testing.assert_allclose(flow[..., 1], 0.0, atol=1e-5)


def test_bad_scores_are_rejected():
    plan = torch.zeros(SRC.grid_size**2, TRG.grid_size**2)
    with pytest.raises(PipelineError, match=r"scores must be \[N, M\] = \[64, 64\] for these canvases, got \[64, 63\]"):
        transfer_keypoints(plan[:, :63], np.zeros((1, 2)), SRC, TRG)
    with pytest.raises(PipelineError, match=r"not a transport plan; pass a temperature"):
        dense_flow(plan - 1, SRC, TRG)
