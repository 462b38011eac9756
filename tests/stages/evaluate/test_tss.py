"""The TSS protocol: the official tool's scores.csv reproduced, and the resize/error rules on tiny flows."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DataError
from stages.datasets.flo import UNKNOWN_FLOW, flow_validity, write_flo
from stages.evaluate.tss import (
    endpoint_errors,
    flow_accuracy,
    resize_flow,
    resize_mask,
    score_direction,
    score_tss_results,
    segmentation_iou,
)


def read_gray(path: Path) -> np.ndarray:
    """8-bit grayscale rendering of a PNG (palette expanded), as OpenCV's IMREAD_GRAYSCALE reads it."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def test_scores_reproduce_the_official_csv(shared_fixtures: Path) -> None:
    results_dir = shared_fixtures / "tss" / "official-results" / "JODS"
    with open(results_dir / "scores.csv", newline="") as handle:
        expected = list(csv.DictReader(handle))

    scores = score_tss_results(results_dir, shared_fixtures / "tss" / "TSS_CVPR2016" / "JODS", read_mask=read_gray)
    rows = scores.rows()

    assert len(rows) == len(expected) == 6
    assert [r["Row"] for r in rows] == [
        "car_01_02_1to2", "car_01_02_2to1", "car_03_04_1to2", "car_03_04_2to1", "Average", "w/o flip",
    ]  # fmt: skip
    # the tool labels both directions "_1to2"; the second row of a pair is image2 -> image1
    assert [r["Row"] for r in expected[:4]] == ["car_01_02_1to2"] * 2 + ["car_03_04_1to2"] * 2
    for got, want in zip(rows, expected, strict=True):
        assert (got["Src"], got["Ref"], got["Flip"]) == (want["Src"], want["Ref"], int(want["Flip"]))
        for t in range(1, 51):
            assert got[f"T{t}"] == pytest.approx(float(want[f"T{t}"]), abs=1e-5), (got["Row"], t)
        assert got["SegIUR"] == pytest.approx(float(want["SegIUR"]), abs=1e-6), got["Row"]
    assert scores.accuracy.shape == (4, 50)
    assert not scores.flip.any()


def test_scores_without_mask_reader_leave_seg_iou_unscored(shared_fixtures: Path) -> None:
    tss = shared_fixtures / "tss"
    scores = score_tss_results(tss / "official-results" / "JODS", tss / "TSS_CVPR2016" / "JODS")
    assert np.isnan(scores.seg_iou).all()
    assert scores.average[4] == pytest.approx(0.800570, abs=1e-5)  # the headline T5


def test_missing_prediction_names_the_file(shared_fixtures: Path, tmp_path: Path) -> None:
    pair_dir = tmp_path / "results" / "car_01_02"
    pair_dir.mkdir(parents=True)
    write_flo(pair_dir / "flow1.flo", np.zeros((212, 340, 2), np.float32))
    with pytest.raises(DataError, match=r"car_01_02/flow2\.flo: flow file is missing"):
        score_tss_results(tmp_path / "results", shared_fixtures / "tss" / "TSS_CVPR2016" / "JODS")


def test_empty_results_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no pair folders to score"):
        score_tss_results(tmp_path, tmp_path)


def hand_flows() -> tuple[np.ndarray, np.ndarray]:
    """A 1 x 4 ground truth with one unknown pixel, and a prediction with its own unknown pixel."""
    gt = np.array([[[0, 0], [1, 0], [3, 4], [UNKNOWN_FLOW, UNKNOWN_FLOW]]], np.float32)
    pred = np.array([[[0, 0], [1, 2], [UNKNOWN_FLOW, UNKNOWN_FLOW], [0, 0]]], np.float32)
    return pred, gt


def test_endpoint_errors_are_1000_where_validity_differs() -> None:
    pred, gt = hand_flows()
    np.testing.assert_array_equal(endpoint_errors(pred, gt), [[0, 2, 1000, 1000]])


def test_flow_accuracy_counts_known_gt_pixels_only() -> None:
    pred, gt = hand_flows()
    # errors on the 3 known GT pixels: 0, 2 and 1000 (prediction unknown); pixel 4 is not scored
    accuracy = flow_accuracy(pred, gt, np.array([0, 1.5, 2, 999, 1000]))
    np.testing.assert_allclose(accuracy, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert flow_accuracy(pred, gt, 2.0) == pytest.approx(2 / 3)
    assert np.isnan(flow_accuracy(pred, np.full_like(gt, UNKNOWN_FLOW), 2.0))


def test_score_direction_thresholds_by_the_target_image() -> None:
    gt = np.zeros((4, 5, 2), np.float32)
    pred = gt + np.array([3, 0], np.float32)  # every pixel 3 px off
    accuracy = score_direction(pred, gt, (100, 50))  # thresholds T/100 * 100 = T px
    np.testing.assert_array_equal(accuracy, (np.arange(1, 51) >= 3).astype(float))


def test_resize_keeps_a_constant_translation() -> None:
    flow = np.broadcast_to(np.array([3, -2], np.float32), (6, 8, 2))
    # both images doubled: a shift of (3, -2) px becomes (6, -4) px everywhere
    resized = resize_flow(flow, (16, 12), (10, 5), (20, 10))
    assert resized.shape == (12, 16, 2)
    np.testing.assert_allclose(resized, np.broadcast_to([6, -4], (12, 16, 2)), atol=1e-5)


def test_resize_rescales_by_the_other_image_size() -> None:
    rng = np.random.default_rng(0)
    flow = rng.uniform(-5, 5, (6, 8, 2)).astype(np.float32)
    # this image keeps its size; the other one goes from 10 x 5 to 5 x 10
    resized = resize_flow(flow, (8, 6), (10, 5), (5, 10))
    x, y = np.meshgrid(np.arange(8), np.arange(6))
    np.testing.assert_allclose(resized[..., 0], (flow[..., 0] + x) * 0.5 - x, atol=1e-5)
    np.testing.assert_allclose(resized[..., 1], (flow[..., 1] + y) * 2.0 - y, atol=1e-5)


def test_resize_samples_at_pixel_centres_like_align_corners_false() -> None:
    rng = np.random.default_rng(1)
    flow = rng.uniform(-5, 5, (5, 7, 2)).astype(np.float32)
    new_width, new_height = 11, 4
    resized = resize_flow(flow, (new_width, new_height), (7, 5), (7, 5))
    sampled = (
        F.interpolate(
            torch.from_numpy(flow).permute(2, 0, 1)[None],
            size=(new_height, new_width),
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    x, y = np.meshgrid(np.arange(new_width), np.arange(new_height))
    # same other image size: u' = u + x * w_old / w_new - x
    expected = sampled + np.stack([x * (7 / new_width - 1), y * (5 / new_height - 1)], axis=-1)
    np.testing.assert_allclose(resized, expected, atol=1e-5)


def test_resize_marks_the_footprint_of_unknown_vectors() -> None:
    flow = np.zeros((4, 4, 2), np.float32)
    flow[1, 1] = UNKNOWN_FLOW
    resized = resize_flow(flow, (8, 8), (4, 4), (8, 8))
    # upsampling 2x, new pixels 1..4 (sampled at 0.25, 0.75, 1.25, 1.75) lean on old pixel 1 along each axis
    expected_unknown = np.zeros((8, 8), bool)
    expected_unknown[1:5, 1:5] = True
    np.testing.assert_array_equal(~flow_validity(resized), expected_unknown)
    np.testing.assert_array_equal(resized[~expected_unknown], 0)


def test_resize_mask_thresholds_the_bilinear_value_above_128() -> None:
    mask = np.array([[0, 255]], np.uint8)
    # sampled at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped): values 0, 64, 191, 255
    np.testing.assert_array_equal(resize_mask(mask, (4, 1)), [[False, False, True, True]])


def test_segmentation_iou() -> None:
    pred = np.array([[1, 1, 0, 0]])
    gt = np.array([[0, 255, 255, 0]])
    assert segmentation_iou(pred, gt) == pytest.approx(1 / 3)
