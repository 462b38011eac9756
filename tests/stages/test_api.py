"""The notebook API: match two real photos given as paths, PIL images or arrays; load a benchmark pair."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure
from PIL import Image
from skimage import data as skdata

import pipeline
from pipeline.cli import cli
from stages import api
from stages.report.draw import GAP
from tests.catalogs import write_demo_catalog

# The target is the astronaut's crop [60, 460) x [40, 340) resized by 0.75 to 300 x 225.
CROP_X0, CROP_Y0, CROP_X1, CROP_Y1, SCALE = 60, 40, 460, 340, 0.75
FAST = {"outer_iters": 3, "inner_iters": 30}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, Image.Image]:
    """scikit-image's astronaut (an array) and its crop, resized (a PIL image): a pair of known geometry."""
    astronaut = skdata.astronaut()
    crop = Image.fromarray(astronaut[CROP_Y0:CROP_Y1, CROP_X0:CROP_X1])
    size = (round((CROP_X1 - CROP_X0) * SCALE), round((CROP_Y1 - CROP_Y0) * SCALE))
    return astronaut, crop.resize(size, Image.Resampling.BICUBIC)


def test_match_images_with_daisy_finds_the_crop_and_plots_it(photos, tmp_path):
    astronaut, crop = photos
    points = np.array([[150.0, 120.0], [260.0, 200.0], [380.0, 300.0], [300.0, 90.0]])
    match = pipeline.match_images(astronaut, crop, backbone="daisy", matcher="gwot", points=points, params=FAST)
    assert isinstance(match, api.Match)
    assert match.setting.label == "gwot[outer_iters=3,inner_iters=30]" and match.backbone == "daisy"
    np.testing.assert_array_equal(match.points, points)
    assert match.predictions.shape == (4, 2)
    assert ((match.predictions >= -0.5) & (match.predictions <= [299.5, 224.5])).all()  # inside the target
    truth = (points - [CROP_X0, CROP_Y0] + 0.5) * SCALE - 0.5
    patch = 14 * 300 / 448  # the catalog's DAISY canvas is 448 px: one patch in target pixels
    assert np.median(np.linalg.norm(match.predictions - truth, axis=1)) < 2 * patch

    grid = 448 // 14
    assert match.scores.shape == (grid * grid, grid * grid) and match.scores.dtype == np.float32
    assert match.canvases[1].width == 300 and match.canvases[1].height == 225
    assert (match.scores >= 0).all() and 0 < match.scores.sum() <= 1 + 1e-4  # a transport plan's mass

    figure = match.plot()
    assert isinstance(figure, Figure)
    width, height = figure.canvas.get_width_height()
    assert (height, width) == (512, 512 + GAP + 683)  # the target scaled to the source's 512 rows
    picture = match.plot(tmp_path / "match.png")
    assert isinstance(picture, Figure) and (tmp_path / "match.png").stat().st_size > 10_000


def test_paths_pil_images_and_arrays_give_the_same_match(photos, tmp_path):
    astronaut, crop = photos
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    crop.save(tmp_path / "crop.png")
    options = {"backbone": "daisy", "matcher": "nn", "points": [[200, 200], [300, 250]]}
    from_paths = api.match_images(str(tmp_path / "astronaut.png"), tmp_path / "crop.png", **options)
    from_arrays = api.match_images(astronaut.astype(np.float32) / 255, np.asarray(crop), **options)
    from_pil = api.match_images(Image.fromarray(astronaut).convert("L").convert("RGB"), crop, **options)
    np.testing.assert_allclose(from_paths.predictions, from_arrays.predictions)
    np.testing.assert_allclose(from_paths.scores, from_arrays.scores)
    assert from_pil.predictions.shape == (2, 2)
    assert from_paths.setting.params.temperature == 0.02  # the catalog's nn, its defaults


def test_bad_arguments_raise_value_or_type_errors_before_any_model_is_loaded(photos, tmp_path):
    astronaut, crop = photos
    loads = api.load_backbone.cache_info().misses
    cases = [
        ({"img0": tmp_path / "nope.png"}, ValueError, r"nope\.png: image file is missing"),
        ({"img0": astronaut[:, :, :2]}, ValueError, r"img0: expected an \[H, W\], \[H, W, 3\] or \[H, W, 4\]"),
        ({"img1": np.full((8, 8, 3), 2.0)}, ValueError, r"img1: float pixels must be finite and in \[0, 1\]"),
        ({"img1": [[0, 1], [2, 3]]}, TypeError, r"img1: expected a file path, a PIL image or an \[H, W, 3\] array"),
        ({"points": [[10, 10], [600, 10]]}, ValueError, r"point \(600, 10\) lies outside the source image img0"),
        ({"points": [1, 2, 3]}, ValueError, r"points must be a non-empty \[K, 2\] array"),
        ({"params": {"eps": -1}}, ValueError, r"params\.eps: must be a finite number >= 0\.0001 .*, got -1"),
        ({"params": {"epz": 1}}, ValueError, r"params: unknown key\(s\) 'epz'"),
        ({"matcher": "gwto"}, ValueError, r"unknown matcher 'gwto'; the catalog defines: .*gwot"),
        ({"backbone": "dino"}, ValueError, r"unknown backbone 'dino'"),
        ({"matcher": 3}, TypeError, r"matcher: expected a catalog matcher name"),
        ({"grid_points": 0}, ValueError, r"grid_points must be >= 1"),
    ]
    for change, error, message in cases:
        arguments = {"img0": astronaut, "img1": crop, "backbone": "daisy", **change}
        with pytest.raises(error, match=message):
            api.match_images(arguments.pop("img0"), arguments.pop("img1"), **arguments)
    assert api.load_backbone.cache_info().misses == loads


def test_the_package_exports_the_api_and_its_version_and_the_help_imports_no_stage():
    from pipeline import __version__, load_pair, match_images

    assert match_images is api.match_images and load_pair is api.load_pair
    assert __version__ == "0.1.0"
    with pytest.raises(AttributeError, match="no attribute 'match_pictures'"):
        pipeline.match_pictures  # noqa: B018
    assert pipeline.__all__ == ["__version__", "match_images", "load_pair", "Match", "BenchmarkPair", "PairFeatures"]
    code = (
        "import sys; from click.testing import CliRunner; from pipeline.cli import cli; "
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'stages', 'pandas', 'matplotlib')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    # `pipeline --help` reads the registry and the registered commands: no stage, no torch, pandas or matplotlib
    assert result.stdout.strip() == "['stages', 'stages.commands', 'stages.listing', 'stages.matcher_params']"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A demo dataset normalised, its DAISY features computed and matched with NN: the catalog's path."""
    matchers = {"nn": {"method": "nn"}, "gwot": {"method": "gwot", "params": FAST}}
    catalog = write_demo_catalog(
        tmp_path_factory.mktemp("demo"), n_pairs=2, max_side=128, n_keypoints=10, matchers=matchers
    )
    result = CliRunner().invoke(
        cli, ["--catalog", str(catalog), "-q", "run", "--dataset", "demo", "--stage", "download", "--stage",
              "normalize", "--stage", "features", "--stage", "match", "--matcher", "nn"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return catalog


def test_load_pair_returns_images_keypoints_and_the_cached_features(demo_run):
    pairs = pd.read_parquet(demo_run.parent / "data" / "normalized" / "demo" / "pairs.parquet")
    row = pairs.sort_values("pair_id").iloc[0]
    pair = api.load_pair("demo", row["pair_id"], catalog=demo_run)
    assert pair.category == row["category"] and pair.info["threshold_kind"] == row["threshold_kind"]
    np.testing.assert_array_equal(pair.src_kps, np.stack(row["src_kps"]))
    np.testing.assert_array_equal(pair.trg_kps, np.stack(row["trg_kps"]))
    assert pair.src_image.dtype == np.uint8 and pair.src_image.ndim == 3
    features = pair.features
    assert features.tokens.shape[:3] == (2, 8, 8) and features.tokens.dtype == np.float16
    assert features.valid.shape == (2, 8, 8) and features.backbone == "daisy"
    assert features.canvases[0].width == pair.src_image.shape[1]

    # The cached features matched here give the match stage's very predictions (NN: no batch effect).
    match = pair.match("nn")
    stored = pd.read_parquet(demo_run.parent / "outputs" / "default" / "keypoints")
    stored = stored[stored["pair_id"] == row["pair_id"]].sort_values("kp_index")
    np.testing.assert_allclose(match.predictions, stored[["pred_x", "pred_y"]].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(match.errors, stored["error"].to_numpy(), atol=1e-6)
    assert isinstance(pair.match("gwot").plot(), Figure)

    bare = api.load_pair("demo", row["pair_id"], catalog=demo_run, features=False)
    assert bare.features is None
    with pytest.raises(ValueError, match="loaded without features"):
        bare.match()
    with pytest.raises(ValueError, match=r"dataset 'demo' has no pair 'nope' \(2 pairs, e\.g\. "):
        api.load_pair("demo", "nope", catalog=demo_run)
    with pytest.raises(ValueError, match="unknown dataset 'spair'"):
        api.load_pair("spair", "x", catalog=demo_run)
