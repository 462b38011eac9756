"""The demo benchmark: deterministic files whose images, flows, masks and keypoints agree with each other."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from pipeline.catalog import DatasetSpec
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems
from stages.datasets.demo import (
    Warp,
    antialiasing_sigma,
    draw_pairs,
    materialize,
    normalize,
    pair_files,
    parse_options,
)
from stages.datasets.flo import flow_validity, read_flo


def spec(**options) -> DatasetSpec:
    return DatasetSpec(name="demo", kind="demo", options=options)


def bilinear(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample an [H, W, C] array at points [N, 2] (x, y) -> [N, C]."""
    coords = [points[:, 1], points[:, 0]]
    return np.stack([ndimage.map_coordinates(image[..., c], coords, order=1) for c in range(image.shape[2])], 1)


def load(raw_dir: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(raw_dir / relative)).astype(np.float64)


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The demo as ``make demo`` builds it (12 pairs, long side 320)."""
    raw_dir = tmp_path_factory.mktemp("demo")
    materialize(raw_dir, spec())
    return raw_dir, json.loads((raw_dir / "annotations.json").read_text())["pairs"]


@pytest.fixture(scope="module")
def default_warps() -> dict[str, Warp]:
    """The warps of the default demo's pairs, drawn again by the generator, by pair id."""
    return {pair.pair_id: pair.warp for pair in draw_pairs(parse_options(spec()), "demo")}


def test_annotations_record_the_warp_each_pair_was_drawn_with(default_demo, default_warps):
    _, records = default_demo
    assert [record["pair_id"] for record in records] == list(default_warps)
    for record in records:
        assert record["warp"] == json.loads(json.dumps(asdict(default_warps[record["pair_id"]])))


def small_demo(raw_dir: Path, **options) -> Path:
    materialize(raw_dir, spec(n_pairs=2, max_side=64, n_keypoints=5, **options))
    return raw_dir


def test_pairs_cycle_through_the_photos_downscaled_to_max_side(default_demo):
    raw_dir, records = default_demo
    originals = {
        "astronaut": skdata.astronaut(),
        "chelsea": skdata.chelsea(),
        "coffee": skdata.coffee(),
        "rocket": skdata.rocket(),
        "motorcycle": skdata.stereo_motorcycle()[0],
    }
    assert [r["category"] for r in records] == (list(originals) * 3)[:12]
    assert [r["mirrored"] for r in records] == [i in (3, 7, 11) for i in range(12)]
    assert [r["variant"] for r in records] == ["normal", "smaller", "larger", "mirrored"] * 3
    zooms = {"normal": (0.8, 1.05), "mirrored": (0.8, 1.05), "smaller": (0.4, 0.525), "larger": (1.6, 2.1)}
    for record in records:
        low, high = zooms[record["variant"]]
        assert all(low <= s <= high for s in record["warp"]["scale"]), record["pair_id"]
    for record in records:
        files = pair_files(record["pair_id"])
        src, trg = load(raw_dir, files["src"]), load(raw_dir, files["trg"])
        height, width = originals[record["category"]].shape[:2]
        assert max(src.shape[:2]) == 320
        assert src.shape[0] / src.shape[1] == pytest.approx(height / width, abs=0.01)
        assert trg.shape == src.shape


def test_flow_carries_every_source_keypoint_onto_its_target_keypoint(default_demo):
    raw_dir, records = default_demo
    for record in records:
        flow = read_flo(raw_dir / pair_files(record["pair_id"])["flow"]).astype(np.float64)
        src_kps, trg_kps = np.array(record["src_kps"]), np.array(record["trg_kps"])
        assert src_kps.shape == (20, 2)
        assert np.abs(src_kps + bilinear(flow, src_kps) - trg_kps).max() < 0.1


def test_target_image_is_the_source_moved_along_the_flow(default_demo, default_warps):
    raw_dir, records = default_demo
    rng = np.random.default_rng(7)
    for record in records:
        files = pair_files(record["pair_id"])
        src, trg = load(raw_dir, files["src"]), load(raw_dir, files["trg"])
        # A shrinking warp renders an antialiased source: compare with the source blurred alike.
        sigma = antialiasing_sigma(default_warps[record["pair_id"]])
        src = ndimage.gaussian_filter(src, (sigma, sigma, 0), mode="nearest")
        flow = read_flo(raw_dir / files["flow"]).astype(np.float64)
        rows, cols = np.nonzero(flow_validity(flow))
        pick = rng.choice(len(rows), 300, replace=False)
        rows, cols = rows[pick], cols[pick]
        moved = np.stack([cols, rows], 1) + flow[rows, cols]
        difference = np.abs(bilinear(trg, moved) - src[rows, cols]).mean()
        # The same pixels against an unrelated position show the test has teeth.
        shuffled = np.abs(bilinear(trg, moved[::-1]) - src[rows, cols]).mean()
        assert difference < 8, record["pair_id"]
        assert shuffled > 4 * difference, record["pair_id"]


def test_drawn_warp_reproduces_the_stored_flow_and_inverts_exactly(default_demo, default_warps):
    raw_dir, records = default_demo
    for record in records[:3]:
        warp = default_warps[record["pair_id"]]
        flow = read_flo(raw_dir / pair_files(record["pair_id"])["flow"]).astype(np.float64)
        height, width = flow.shape[:2]
        rows, cols = np.nonzero(flow_validity(flow))
        rows, cols = rows[::7], cols[::7]
        points = np.stack([cols, rows], 1).astype(np.float64)
        mapped = warp.forward(points)
        np.testing.assert_allclose(mapped - points, flow[rows, cols], atol=1e-3)
        assert np.abs(warp.inverse(mapped) - points).max() < 0.05
        assert mapped[:, 0].min() >= 0 and mapped[:, 0].max() <= width - 1
        assert mapped[:, 1].min() >= 0 and mapped[:, 1].max() <= height - 1


def test_mirrored_pairs_reverse_the_horizontal_order(default_demo):
    raw_dir, records = default_demo
    _, pairs = normalize(raw_dir, spec(), BadItems("demo"))
    assert pairs.column("flip").to_pylist() == [r["mirrored"] for r in records]
    for record in records:
        src_kps, trg_kps = np.array(record["src_kps"]), np.array(record["trg_kps"])
        left, right = np.argmin(src_kps[:, 0]), np.argmax(src_kps[:, 0])
        order = np.sign(trg_kps[right, 0] - trg_kps[left, 0])
        # d(x + u)/dx: the target column moves against the source column only where the pair is mirrored.
        flow = read_flo(raw_dir / pair_files(record["pair_id"])["flow"]).astype(np.float64)
        trg_x = flow[..., 0] + np.arange(flow.shape[1])
        stretch = np.diff(trg_x, axis=1)[flow_validity(flow)[:, 1:] & flow_validity(flow)[:, :-1]]
        expected = -1 if record["mirrored"] else 1
        assert order == expected, record["pair_id"]
        assert np.median(np.sign(stretch)) == expected, record["pair_id"]


def test_normalize_tables_match_the_annotations(default_demo):
    raw_dir, records = default_demo
    images, pairs = normalize(raw_dir, spec(), BadItems("demo"))
    pairs = pairs.to_pylist()
    images = {row["image_id"]: row for row in images.to_pylist()}
    assert len(images) == 24 and len(pairs) == 12
    for record, pair in zip(records, pairs, strict=True):
        pair_id = record["pair_id"]
        src, trg = images[f"{pair_id}/src"], images[f"{pair_id}/trg"]
        assert pair["pair_id"] == pair_id and pair["split"] == "test" and pair["dataset"] == "demo"
        assert pair["category"] == src["category"] == trg["category"] == record["category"]
        assert (pair["src_image_id"], pair["trg_image_id"]) == (f"{pair_id}/src", f"{pair_id}/trg")
        assert pair["src_kps"] == record["src_kps"] and pair["trg_kps"] == record["trg_kps"]
        assert pair["kps_ids"] == list(range(20))
        assert pair["threshold_kind"] == "trg_image" and pair["flip"] == record["mirrored"]
        assert pair["variant"] == record["variant"]
        assert pair["flow_path"] == f"flow/{pair_id}.flo"
        assert pair["direction"] is None and pair["group"] is None
        assert src["path"] == f"images/{pair_id}_src.png" and trg["path"] == f"images/{pair_id}_trg.png"
        assert src["mask_path"] == f"masks/{pair_id}_src.png" and trg["mask_path"] is None
        for image, kps in ((src, pair["src_kps"]), (trg, pair["trg_kps"])):
            height, width = load(raw_dir, image["path"]).shape[:2]
            assert (image["width"], image["height"]) == (width, height)
            points = np.array(kps)
            assert (points >= 0).all() and (points[:, 0] <= width - 1).all() and (points[:, 1] <= height - 1).all()
        mask = load(raw_dir, src["mask_path"])
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, flow_validity(read_flo(raw_dir / pair["flow_path"])))
        # A larger (~2x) target shows about a quarter of the source.
        assert (mask > 0).mean() > (0.15 if record["variant"] == "larger" else 0.5)


def test_keypoints_sit_on_texture(default_demo):
    raw_dir, records = default_demo
    for record in records:
        gray = load(raw_dir, pair_files(record["pair_id"])["src"]).mean(axis=2)
        local_std = np.sqrt(np.maximum(ndimage.uniform_filter(gray**2, 5) - ndimage.uniform_filter(gray, 5) ** 2, 0))
        cols, rows = np.rint(np.array(record["src_kps"])).astype(int).T
        assert np.median(local_std[rows, cols]) > np.median(local_std), record["pair_id"]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first, again, other = (small_demo(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * 4 + 1
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative
    for relative in (
        Path("annotations.json"),
        Path("flow/000-astronaut.flo"),
        Path("images/001-chelsea_trg.png"),
    ):
        assert (first / relative).read_bytes() != (other / relative).read_bytes(), relative
    # The photo itself does not depend on the seed.
    assert (first / "images/000-astronaut_src.png").read_bytes() == (
        other / "images/000-astronaut_src.png"
    ).read_bytes()


def test_deleted_image_is_a_data_error_naming_it(tmp_path):
    raw_dir = small_demo(tmp_path)
    (raw_dir / "images/001-chelsea_trg.png").unlink()
    with pytest.raises(DataError, match=r"images/001-chelsea_trg\.png: image file is missing"):
        normalize(raw_dir, spec(), BadItems("demo"))
    bad = BadItems("demo", skip_bad=True)
    images, pairs = normalize(raw_dir, spec(), bad)
    assert pairs.column("pair_id").to_pylist() == ["000-astronaut"]
    assert images.column("image_id").to_pylist() == ["000-astronaut/src", "000-astronaut/trg"]
    assert [row["path"].endswith("001-chelsea_trg.png") for row in bad.rows()] == [True]


def test_missing_annotations_and_wrong_size_mask_are_data_errors(tmp_path):
    raw_dir = small_demo(tmp_path)
    Image.new("L", (7, 5)).save(raw_dir / "masks/000-astronaut_src.png")
    with pytest.raises(DataError, match=r"000-astronaut_src\.png: is 7x5, expected 64x64"):
        normalize(raw_dir, spec(), BadItems("demo"))
    (raw_dir / "annotations.json").unlink()
    with pytest.raises(DataError, match="annotations.json: annotations file is missing"):
        normalize(raw_dir, spec(), BadItems("demo"))


def test_a_demo_written_before_variants_asks_to_regenerate_it(tmp_path):
    raw_dir = small_demo(tmp_path)
    document = json.loads((raw_dir / "annotations.json").read_text())
    del document["pairs"][0]["variant"]
    (raw_dir / "annotations.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"000-astronaut: variant None is not one of normal, mirrored, smaller, larger"):
        normalize(raw_dir, spec(), BadItems("demo"))


def test_unknown_option_lists_the_valid_keys(tmp_path):
    with pytest.raises(
        CatalogError, match=r"unknown key\(s\) 'n_pair'; valid keys are larger_fraction, max_side, mirrored_fraction, "
    ):
        materialize(tmp_path, spec(n_pair=3))
    with pytest.raises(
        CatalogError, match=r"datasets\.demo\.options\.mirrored_fraction: must be in \[0, 1\], got 1\.5"
    ):
        parse_options(spec(mirrored_fraction=1.5))
    with pytest.raises(CatalogError, match=r"options\.n_pairs: expected an integer, got str"):
        parse_options(spec(n_pairs="3"))
    with pytest.raises(
        CatalogError, match=r"options\.n_keypoints: astronaut \(normal\) has fewer than 999 textured points"
    ):
        materialize(tmp_path, spec(n_pairs=2, max_side=64, n_keypoints=999))
