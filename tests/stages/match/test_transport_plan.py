"""Windowed transport plans: read out, mirrored, selected and stacked exactly like their dense arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.features.canvas import CanvasTransform
from stages.match.gwot import gwot
from stages.match.readout import dense_flow, transfer_keypoints
from stages.match.transport_plan import TransportPlan, stack_plans
from tests.stages.match.test_gwot import smooth_features
from tests.stages.match.test_windows import random_windows, windowed_plan

pytestmark = pytest.mark.filterwarnings("ignore::stages.match.gwot.ConvergenceWarning")
# 20 x 20 patch grids with padding: a landscape source, a portrait target.
SRC = CanvasTransform.fit(width=270, height=180, canvas_size=280, patch_size=14)
TRG = CanvasTransform.fit(width=200, height=260, canvas_size=280, patch_size=14)


def solved_plan() -> TransportPlan:
    """A coarse-to-fine GWOT plan of smooth features on the two canvases' grids (padding invalid)."""
    src_feats, trg_feats = smooth_features(1, 20, 20, seed=3), smooth_features(1, 20, 20, seed=4)
    valid = [torch.from_numpy(t.valid_patches())[None] for t in (SRC, TRG)]
    plan = gwot(src_feats, trg_feats, *valid, window_radius=2, outer_iters=4).plan
    assert plan.is_windowed and plan.values.shape == (1, 400, 25) and plan.shape == (1, 400, 400)
    return plan


def with_empty_rows(plan: TransportPlan, rows: list[int]) -> TransportPlan:
    """The plan with some source rows emptied (as an unbalanced plan may leave them)."""
    values = plan.values.clone()
    values[0, rows] = 0
    return TransportPlan(values, plan.windows)


def test_windowed_readout_equals_the_dense_readout_of_the_same_plan():
    plan = with_empty_rows(solved_plan(), [0, 45, 210])
    dense = plan.dense()[0]
    keypoints = np.random.default_rng(0).uniform([0, 0], [269, 179], size=(60, 2))
    keypoints[:3] = [[0, 0], [269, 179], [135.5, 90.25]]  # corners and a point between patch centres
    for window in (1, 3, 5):
        windowed_points = transfer_keypoints(plan, keypoints, SRC, TRG, window=window)
        np.testing.assert_array_equal(windowed_points, transfer_keypoints(dense, keypoints, SRC, TRG, window=window))
        np.testing.assert_array_equal(
            dense_flow(plan, SRC, TRG, window=window), dense_flow(dense, SRC, TRG, window=window)
        )


def test_a_windowed_plan_is_read_as_a_plan():
    with pytest.raises(Exception, match="windowed transport plan is read as a plan: pass no temperature"):
        transfer_keypoints(solved_plan(), np.zeros((1, 2)), SRC, TRG, temperature=0.02)


def test_mirroring_selecting_and_stacking_windowed_plans_match_their_dense_arrays():
    grid = (4, 5)
    first, second = (random_windows(grid, (6, 7), (3, 3), batch=3, seed=seed) for seed in (0, 1))
    plans = [TransportPlan(windowed_plan(windows, seed)[0], windows) for seed, windows in enumerate((first, second))]
    dense = [plan.dense() for plan in plans]
    mirrored = plans[0].mirror_rows(grid).dense()
    torch.testing.assert_close(mirrored, dense[0].reshape(3, *grid, 42).flip(2).reshape(3, 20, 42), rtol=0, atol=0)
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(plans[0].where(mask, plans[1]).dense(), torch.where(mask[:, None, None], *dense))
    stacked = stack_plans([plans[0][2], plans[1]])
    assert len(stacked) == 4 and [len(pair) for pair in stacked] == [1] * 4
    torch.testing.assert_close(stacked.dense(), torch.cat([dense[0][2:], dense[1]]), rtol=0, atol=0)
    with pytest.raises(IndexError):
        plans[0][3]
