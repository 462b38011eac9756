"""Matching your own pair: real photos in; one picture per matcher and a JSON of the points out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pipeline.catalog import BackboneSpec, MatcherSpec
from pipeline.errors import CatalogError, InputError, PipelineError
from stages.api import point_grid
from stages.match_pair import match_pair, parse_points
from stages.report.draw import GAP

DAISY_224 = BackboneSpec(name="daisy", model="daisy", weights="none", image_size=224)
DAISY_112 = BackboneSpec(name="daisy", model="daisy", weights="none", image_size=112)
NN = MatcherSpec(name="nn", method="nn")
FAST_GWOT = MatcherSpec(name="gwot", method="gwot", params={"outer_iters": 3, "inner_iters": 30})
# The target is the source's crop [CROP_X0, CROP_X1) x [CROP_Y0, CROP_Y1) resized by SCALE: a 300 x 225 JPEG.
CROP_X0, CROP_Y0, CROP_X1, CROP_Y1, SCALE = 60, 40, 460, 340, 0.75


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``astronaut.png`` (512 x 512) and ``crop.jpg``, its crop resized: a pair with a known similarity."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skdata.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    crop = Image.fromarray(astronaut[CROP_Y0:CROP_Y1, CROP_X0:CROP_X1])
    size = (round((CROP_X1 - CROP_X0) * SCALE), round((CROP_Y1 - CROP_Y0) * SCALE))
    crop.resize(size, Image.Resampling.BICUBIC).save(folder / "crop.jpg", quality=92)
    return folder / "astronaut.png", folder / "crop.jpg"


def true_target(points: np.ndarray) -> np.ndarray:
    """Where source points land in the crop (pixel-centre convention, as the resize)."""
    return (points - [CROP_X0, CROP_Y0] + 0.5) * SCALE - 0.5


def test_grid_of_points_matches_both_matchers_and_writes_pictures_and_json(photos, tmp_path):
    src_path, trg_path = photos
    result = match_pair(
        src_path,
        trg_path,
        backbone=DAISY_224,
        matchers=[NN, FAST_GWOT],
        points=None,
        out_dir=tmp_path,
        device="cpu",
    )
    assert result.json_path == tmp_path / "astronaut-crop.json"
    assert result.pictures == {name: tmp_path / f"astronaut-crop-{name}.png" for name in ("nn", "gwot")}
    for path in result.pictures.values():
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=float)
        # both images at the source's height 512; the 300 x 225 target becomes 683 px wide
        assert pixels.shape == (512, 512 + GAP + 683, 3)
        assert pixels.var() > 1000

    record = json.loads(result.json_path.read_text())
    assert record["src"] == {"path": str(src_path.resolve()), "width": 512, "height": 512}
    assert record["trg"] == {"path": str(trg_path.resolve()), "width": 300, "height": 225}
    assert record["backbone"]["name"] == "daisy" and record["backbone"]["random_weights"] is False
    assert record["backbone"]["params"]["image_size"] == 224
    assert set(record["matchers"]) == {"nn", "gwot"}
    assert record["matchers"]["gwot"]["params"]["outer_iters"] == 3
    assert record["matchers"]["nn"]["params"] == {"window": 3, "temperature": 0.02}  # the NN defaults
    points = np.asarray(record["matchers"]["nn"]["points"])
    np.testing.assert_allclose(points, point_grid(512, 512, 8))
    np.testing.assert_allclose(result.points, points)

    patch = 14 * 300 / 224  # one patch in target pixels
    well_inside = (
        (points[:, 0] > CROP_X0 + 20) & (points[:, 0] < CROP_X1 - 20)
        & (points[:, 1] > CROP_Y0 + 20) & (points[:, 1] < CROP_Y1 - 20)
    )  # fmt: skip
    for name, matcher in record["matchers"].items():
        predictions = np.asarray(matcher["predictions"])
        assert predictions.shape == (64, 2)
        np.testing.assert_allclose(predictions, result.predictions[name])
        assert (predictions >= -0.5).all() and (predictions[:, 0] <= 299.5).all() and (predictions[:, 1] <= 224.5).all()
        # a real match, not noise: DAISY at a 16 x 16 grid finds the crop's points within two patches
        errors = np.linalg.norm(predictions - true_target(points), axis=1)[well_inside]
        assert np.median(errors) < 2 * patch, (name, np.median(errors))


def test_explicit_points_are_recorded_exactly(photos, tmp_path):
    points = np.array([[100.0, 100.0], [250.5, 300.0], [-0.5, 511.5]])
    result = match_pair(*photos, backbone=DAISY_112, matchers=[NN], points=points, out_dir=tmp_path)
    record = json.loads(result.json_path.read_text())
    assert record["matchers"]["nn"]["points"] == points.tolist()
    assert result.predictions["nn"].shape == (3, 2)


def test_random_weights_vit_is_labelled_meaningless(photos, tmp_path):
    backbone = BackboneSpec(
        name="vits-random", model="vit_small_patch14_dinov2.lvd142m", weights="random", image_size=56
    )
    result = match_pair(
        *photos,
        backbone=backbone,
        matchers=[FAST_GWOT],
        points=None,
        out_dir=tmp_path,
        device="cpu",
        grid_points=3,
    )
    record = json.loads(result.json_path.read_text())
    assert record["backbone"]["random_weights"] is True
    assert "-RANDOM-" in record["backbone"]["key"]
    predictions = np.asarray(record["matchers"]["gwot"]["predictions"])
    assert predictions.shape == (9, 2)
    assert (predictions >= -0.5).all() and (predictions <= [299.5, 224.5]).all()


def test_missing_or_unreadable_images_are_named(photos, tmp_path):
    src_path, trg_path = photos
    options = {"backbone": DAISY_112, "matchers": [NN], "points": None, "out_dir": tmp_path}
    with pytest.raises(InputError, match=r"nope\.png: image file is missing"):
        match_pair(tmp_path / "nope.png", trg_path, **options)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(InputError, match=r"notes\.png: not a readable image"):
        match_pair(src_path, text, **options)
    assert not list(tmp_path.glob("*.json"))


def test_a_point_outside_the_source_image_is_named(photos, tmp_path):
    with pytest.raises(
        PipelineError, match=r"point \(600, 10\) lies outside the source image .*astronaut\.png \(512x512"
    ):
        match_pair(
            *photos,
            backbone=DAISY_112,
            matchers=[NN],
            points=np.array([[10.0, 10.0], [600.0, 10.0]]),
            out_dir=tmp_path,
        )


def test_invalid_matcher_parameters_are_refused_before_any_work(tmp_path):
    bad = MatcherSpec(name="gwot", method="gwot", params={"epz": 0.1})
    with pytest.raises(CatalogError, match=r"matchers\.gwot\.params.*'epz'"):
        match_pair(
            tmp_path / "a.png",
            tmp_path / "b.png",
            backbone=DAISY_112,
            matchers=[bad],
            points=None,
            out_dir=tmp_path,
        )


def test_parse_points_reads_space_separated_pairs_from_each_text():
    parsed = parse_points(["10,20 30.5,40", "-0.5,7e1"])
    np.testing.assert_array_equal(parsed, [[10, 20], [30.5, 40], [-0.5, 70]])
    assert parse_points([]) is None
    for text in ("10;20", "10,20,30", "nan,1", "x,1"):
        with pytest.raises(PipelineError, match=f"--points: '{text}' is not a point; expected X,Y"):
            parse_points([text])
    with pytest.raises(PipelineError, match="--points: no point given"):
        parse_points(["  "])


def test_point_grid_takes_the_centres_of_a_regular_tiling():
    np.testing.assert_allclose(point_grid(4, 2, 2), [[0.5, 0.0], [2.5, 0.0], [0.5, 1.0], [2.5, 1.0]])
    with pytest.raises(PipelineError, match="grid_points must be >= 1, got 0"):
        point_grid(4, 2, 0)
