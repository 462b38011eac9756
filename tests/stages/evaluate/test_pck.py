"""PCK: each benchmark's threshold and the <= comparison (the averages over pairs: test_summary.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.evaluate.pck import (
    correct_keypoints,
    keypoint_errors,
    pck_per_pair,
    reference_length,
)


def test_trg_bbox_threshold_uses_the_longer_bbox_side() -> None:
    # w = 110 - 10 = 100, h = 70 - 20 = 50
    assert 0.1 * reference_length("trg_bbox", trg_bbox=[10, 20, 110, 70]) == pytest.approx(10.0)
    # a tall box: h wins
    assert 0.1 * reference_length("trg_bbox", trg_bbox=[0, 0, 30, 80]) == pytest.approx(8.0)


def test_trg_image_threshold_uses_the_longer_image_side() -> None:
    assert 0.05 * reference_length("trg_image", trg_image_size=(640, 480)) == pytest.approx(32.0)
    assert 0.1 * reference_length("trg_image", trg_image_size=(300, 500)) == pytest.approx(50.0)


def test_trg_kps_threshold_uses_the_larger_keypoint_extent() -> None:
    kps = [[5, 10], [35, 15], [15, 50]]  # x extent 30, y extent 40
    assert 0.1 * reference_length("trg_kps", trg_kps=kps) == pytest.approx(4.0)
    assert reference_length("trg_kps", trg_kps=kps) == 40.0


def test_unknown_kind_and_missing_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown PCK threshold kind 'src_bbox'; expected one of trg_bbox"):
        0.1 * reference_length("src_bbox", trg_bbox=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="'trg_bbox' needs trg_bbox, which was not given"):
        0.1 * reference_length("trg_bbox", trg_image_size=(10, 10))
    with pytest.raises(ValueError, match=r"trg_image_size must have shape \[2\]"):
        0.1 * reference_length("trg_image", trg_image_size=(10, 10, 3))
    with pytest.raises(ValueError, match="non-positive reference length"):
        0.1 * reference_length("trg_kps", trg_kps=[[3, 4]])


def test_error_equal_to_the_threshold_counts_as_correct() -> None:
    pred = np.array([[3.0, 4.0], [0.0, 6.0], [1.0, 1.0]])
    true = np.zeros((3, 2))
    errors = keypoint_errors(pred, true)
    np.testing.assert_allclose(errors, [5.0, 6.0, np.sqrt(2)])
    threshold = 0.125 * reference_length("trg_image", trg_image_size=(40, 30))  # exactly 5.0
    assert threshold == 5.0
    np.testing.assert_array_equal(correct_keypoints(errors, threshold), [True, False, True])
    assert pck_per_pair(errors, threshold) == pytest.approx(2 / 3)


def test_several_alphas_at_once() -> None:
    errors = np.array([1.0, 4.0, 9.0])
    thresholds = np.array([0.05, 0.1, 0.2]) * reference_length("trg_bbox", trg_bbox=[0, 0, 50, 20])
    assert correct_keypoints(errors, thresholds).shape == (3, 3)
    np.testing.assert_allclose(pck_per_pair(errors, thresholds), [1 / 3, 2 / 3, 1.0])


def test_pair_without_keypoints_has_no_pck() -> None:
    assert np.isnan(pck_per_pair(np.zeros(0), 5.0))
