"""Pictures: correspondence lines land where the points are, in the right colours; warps move content."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from stages.report.draw import GAP, draw_correspondences, draw_warp, forward_warp, side_by_side

GREY = 128


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def grey(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def most_saturated(picture: np.ndarray, x: int, y: int, radius: int = 1) -> np.ndarray:
    """The pixel of the (2 radius + 1)^2 window at (x, y) farthest from grey (antialiasing blurs edges)."""
    window = picture[y - radius : y + radius + 1, x - radius : x + radius + 1].reshape(-1, 3)
    return window[np.abs(window - GREY).sum(1).argmax()]


def test_side_by_side_scales_to_the_taller_height_and_places_points():
    picture, src_panel, trg_panel = side_by_side(grey(60, 80), grey(30, 50))
    assert picture.shape == (60, 80 + GAP + 100, 3)
    assert (trg_panel.left, trg_panel.scale_x, trg_panel.scale_y) == (80 + GAP, 2.0, 2.0)
    # pixel-centre convention: original pixel 0 covers [-0.5, 0.5) -> [-0.5, 1.5) at scale 2, centre 0.5
    np.testing.assert_allclose(trg_panel.place([[0, 0], [49, 29]]), [[88.5, 0.5], [88 + 98.5, 58.5]])
    np.testing.assert_allclose(src_panel.place([[3, 4]]), [[3, 4]])


def test_correspondences_png_has_the_composed_size_and_green_correct_red_wrong_lines(tmp_path):
    src, trg = grey(60, 80), grey(60, 50)
    # Horizontal lines from x=20 in the source to x=88+25 in the picture: their middle (x=66) is far from
    # every marker.
    path = draw_correspondences(
        src,
        trg,
        np.array([[20.0, 15.0], [20.0, 45.0]]),
        np.array([[25.0, 15.0], [25.0, 45.0]]),
        correct=[True, False],
        title="nn",
        path=tmp_path / "sub" / "pair.png",
    )
    picture = read_png(path)
    assert picture.shape == (60, 80 + GAP + 50, 3)
    r, g, b = most_saturated(picture, 66, 15)
    assert g > 150 and r < 80 and b < 80, (r, g, b)
    r, g, b = most_saturated(picture, 66, 45)
    assert r > 150 and g < 80 and b < 80, (r, g, b)
    assert (np.abs(picture[30, 60] - GREY) <= 1).all()  # between the lines: untouched background


def test_true_points_are_hollow_circles_and_points_without_flags_get_distinct_hues(tmp_path):
    path = draw_correspondences(
        grey(60, 80),
        grey(60, 50),
        np.array([[20.0, 15.0], [20.0, 45.0]]),
        np.array([[25.0, 15.0], [25.0, 45.0]]),
        true_points=np.array([[25.0, 30.0], [40.0, 30.0]]),
        path=tmp_path / "pair.png",
    )
    picture = read_png(path)
    upper, lower = most_saturated(picture, 66, 15), most_saturated(picture, 66, 45)
    assert np.abs(upper - GREY).sum() > 150 and np.abs(lower - GREY).sum() > 150
    assert np.abs(upper - lower).sum() > 100
    # the second true point at picture (88 + 40, 30): a ring of radius 6 px with an untouched centre
    assert (np.abs(picture[30, 128] - GREY) <= 1).all()
    assert np.abs(most_saturated(picture, 128 + 6, 30) - GREY).sum() > 100


def test_draw_correspondences_rejects_mismatched_points(tmp_path):
    with pytest.raises(PipelineError, match=r"pred_points must be \[2, 2\] \(x, y\), got shape \[3, 2\]"):
        draw_correspondences(grey(10, 10), grey(10, 10), np.zeros((2, 2)), np.zeros((3, 2)), path=tmp_path / "x.png")
    with pytest.raises(PipelineError, match="correct must have one flag per point"):
        draw_correspondences(
            grey(10, 10),
            grey(10, 10),
            np.zeros((2, 2)),
            np.zeros((2, 2)),
            correct=[True],
            path=tmp_path / "x.png",
        )
    with pytest.raises(PipelineError, match=r"the target image must be an \[H, W, 3\] uint8 RGB image"):
        draw_correspondences(
            grey(10, 10), np.zeros((10, 10)), np.zeros((1, 2)), np.zeros((1, 2)), path=tmp_path / "x.png"
        )
    assert not (tmp_path / "x.png").exists()


def test_forward_warp_moves_pixels_by_the_flow_and_skips_unknown_vectors():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    flow = np.zeros((20, 30, 2))
    flow[..., 0], flow[..., 1] = 4.4, -2.6  # rounds to (+4, -3)
    flow[10, 10] = 1e10
    warped = forward_warp(src, flow, 25, 40)
    assert warped.shape == (25, 40, 3)
    expected = np.zeros_like(warped)
    expected[0:17, 4:34] = src[3:20]
    expected[10 - 3, 10 + 4] = 0  # the unknown vector's pixel stays a hole
    np.testing.assert_array_equal(warped, expected)


def test_draw_warp_shows_the_source_shifted_by_a_translation_beside_the_target(tmp_path):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
    trg = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
    flow = np.zeros((120, 100, 2))
    flow[..., 0], flow[..., 1] = 7, 3
    picture = read_png(draw_warp(src, trg, flow, path=tmp_path / "warp.png"))
    assert picture.shape == (120, 100 + GAP + 100, 3)
    # below the labels at the top: the source content sits 7 px right and 3 px down, the target beside it
    np.testing.assert_array_equal(picture[40:110, 7:100], src[37:107, 0:93])
    np.testing.assert_array_equal(picture[40:110, :7], 0)
    np.testing.assert_array_equal(picture[40:110, 100 + GAP :], trg[40:110])


def test_draw_warp_rejects_a_flow_of_another_size(tmp_path):
    with pytest.raises(PipelineError, match=r"flow must be \[Hs, Ws, 2\] = \[10, 12, 2\].*got \[12, 10, 2\]"):
        draw_warp(grey(10, 12), grey(10, 12), np.zeros((12, 10, 2)), path=tmp_path / "warp.png")
