"""The PF-WILLOW normaliser on the real fixture classes: images, keypoints, both pair protocols, errors."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.catalog import DatasetSpec
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems
from stages.datasets.pfwillow import normalize

CLASSES = ("car(G)", "duck(S)", "motorbike(M)", "winebottle(wC)")
FOLDER = "PF-dataset-WILLOW"


@pytest.fixture(scope="module")
def willow_dir(shared_fixtures: Path) -> Path:
    return shared_fixtures / "pf-willow"


@pytest.fixture(scope="module")
def tables(willow_dir: Path):
    images, pairs = normalize(willow_dir, DatasetSpec(name="pf-willow", kind="pf-willow"), BadItems("pf-willow"))
    return images.to_pylist(), pairs.to_pylist()


@pytest.fixture
def linked(willow_dir: Path, tmp_path: Path) -> Path:
    """A raw folder whose ``PF-dataset`` (the official zip's name) links to the fixture's image folder."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "PF-dataset").symlink_to(willow_dir / FOLDER, target_is_directory=True)
    return raw


@pytest.fixture
def car_copy(willow_dir: Path, tmp_path: Path) -> Path:
    """A raw folder holding a writable copy of the fixture's ``car(G)`` class only."""
    raw = tmp_path / "raw"
    target = raw / "PF-dataset" / "car(G)"
    target.mkdir(parents=True)
    for file in (willow_dir / FOLDER / "car(G)").iterdir():
        shutil.copyfile(file, target / file.name)
    return raw


def _normalize(raw: Path, skip_bad: bool = False, **options):
    bad = BadItems("pf-willow", skip_bad=skip_bad)
    images, pairs = normalize(raw, DatasetSpec(name="pf-willow", kind="pf-willow", options=options), bad)
    return images.to_pylist(), pairs.to_pylist(), bad


def _mat_kps(png: Path) -> np.ndarray:
    """[10, 2] keypoints read independently of the normaliser."""
    return scipy.io.loadmat(png.with_suffix(".mat"))["pts_coord"].T


def _write_csv(path: Path, pairs: list[tuple[str, str]], folder: Path) -> None:
    """A pair list in the official layout: header, imageA, imageB, xA(10), yA(10), xB(10), yB(10)."""
    header = ["imageA", "imageB"] + [f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in range(1, 11)]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for src, trg in pairs:
            coords = [_mat_kps(folder / f"{name}.png").T.ravel() for name in (src, trg)]
            writer.writerow([f"PF-dataset/{src}.png", f"PF-dataset/{trg}.png", *np.concatenate(coords)])


def test_forty_images_with_their_sizes(tables, willow_dir):
    images, _ = tables
    assert len(images) == 40
    assert sorted({row["category"] for row in images}) == list(CLASSES)
    for row in images:
        assert row["path"] == f"{FOLDER}/{row['image_id']}.png"
        assert row["image_id"].split("/")[0] == row["category"]
        with Image.open(willow_dir / row["path"]) as im:
            assert (row["width"], row["height"]) == im.size
        assert row["bbox"] is None and row["mask_path"] is None


def test_without_csv_every_ordered_pair_within_a_class(tables, willow_dir):
    images, pairs = tables
    assert len(pairs) == 4 * 10 * 9
    names = {c: sorted(r["image_id"].split("/")[1] for r in images if r["category"] == c) for c in CLASSES}
    expected = sorted(f"{c}/{s}-{t}" for c in CLASSES for s, t in itertools.permutations(names[c], 2))
    assert [row["pair_id"] for row in pairs] == expected
    for row in pairs:
        assert row["src_image_id"] != row["trg_image_id"]
        assert row["src_image_id"].split("/")[0] == row["trg_image_id"].split("/")[0] == row["category"]
        assert row["split"] == "test" and row["threshold_kind"] == "trg_kps"
        assert row["kps_ids"] == list(range(10)) and row["flip"] is False


def test_keypoints_equal_the_mat_files(tables, willow_dir):
    _, pairs = tables
    for row in pairs[::37]:
        np.testing.assert_array_equal(row["src_kps"], _mat_kps(willow_dir / FOLDER / f"{row['src_image_id']}.png"))
        np.testing.assert_array_equal(row["trg_kps"], _mat_kps(willow_dir / FOLDER / f"{row['trg_image_id']}.png"))


def test_the_csv_selects_exactly_its_pairs(linked, willow_dir):
    listed = [("duck(S)/060_0002", "duck(S)/060_0000"), ("car(G)/Cars_006a", "car(G)/Cars_007a")]
    _write_csv(linked / "test_pairs_pf.csv", listed, willow_dir / FOLDER)
    images, pairs, _ = _normalize(linked)
    assert len(images) == 40 and images[0]["path"] == "PF-dataset/car(G)/Cars_006a.png"
    assert [row["pair_id"] for row in pairs] == ["car(G)/Cars_006a-Cars_007a", "duck(S)/060_0002-060_0000"]
    assert [(row["src_image_id"], row["trg_image_id"]) for row in pairs] == sorted(listed)
    np.testing.assert_array_equal(pairs[1]["src_kps"], _mat_kps(willow_dir / FOLDER / "duck(S)/060_0002.png"))
    assert len(_normalize(linked, pairs="all")[1]) == 360


def test_csv_coordinates_that_disagree_with_the_mat_are_refused(linked, willow_dir):
    csv_path = linked / "test_pairs_pf.csv"
    _write_csv(csv_path, [("car(G)/Cars_006a", "car(G)/Cars_007a")], willow_dir / FOLDER)
    rows = list(csv.reader(csv_path.open()))
    rows[1][2 + 10] = str(float(rows[1][2 + 10]) + 1.0)  # y of A's first keypoint, one pixel off
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"test_pairs_pf\.csv: line 2: keypoints of car\(G\)/Cars_006a differ"):
        _normalize(linked)


def test_a_csv_naming_an_unknown_image_is_refused(linked, willow_dir):
    _write_csv(linked / "test_pairs_pf.csv", [("car(G)/Cars_006a", "car(G)/Cars_007a")], willow_dir / FOLDER)
    text = (linked / "test_pairs_pf.csv").read_text().replace("Cars_007a.png", "Cars_999z.png")
    (linked / "test_pairs_pf.csv").write_text(text)
    with pytest.raises(DataError, match=r"line 2: image 'PF-dataset/car\(G\)/Cars_999z\.png' is not among"):
        _normalize(linked)


def test_missing_folder_and_bad_options(tmp_path, willow_dir):
    with pytest.raises(DataError, match=r"no image folder: expected PF-dataset or PF-dataset-WILLOW"):
        _normalize(tmp_path)
    with pytest.raises(DataError, match=r"test_pairs_pf\.csv: pair list is missing \(options\.pairs is 'csv'\)"):
        _normalize(willow_dir, pairs="csv")
    with pytest.raises(CatalogError, match=r"options: unknown key\(s\) 'pair'; valid keys are pairs"):
        _normalize(willow_dir, pair="all")
    with pytest.raises(CatalogError, match=r"options\.pairs: 'some' is not one of 'auto', 'csv', 'all'"):
        _normalize(willow_dir, pairs="some")


def test_mat_without_pts_coord_is_named(car_copy):
    mat = car_copy / "PF-dataset/car(G)/Cars_008b.mat"
    scipy.io.savemat(mat, {"points": np.zeros((2, 10))})
    with pytest.raises(DataError, match=r"Cars_008b\.mat: no 'pts_coord' variable \(found \['points'\]\)"):
        _normalize(car_copy)


def test_pts_coord_of_the_wrong_shape_is_named(car_copy):
    mat = car_copy / "PF-dataset/car(G)/Cars_008b.mat"
    scipy.io.savemat(mat, {"pts_coord": np.ones((2, 9))})
    with pytest.raises(DataError, match=r"Cars_008b\.mat: 'pts_coord' should be a 2 x 10 numeric array"):
        _normalize(car_copy)


def test_keypoints_outside_the_image_are_named(car_copy):
    mat = car_copy / "PF-dataset/car(G)/Cars_008b.mat"
    coords = scipy.io.loadmat(mat)["pts_coord"]
    coords[0, 3] = 350.0  # the image is 300 px wide
    scipy.io.savemat(mat, {"pts_coord": coords})
    with pytest.raises(DataError, match=r"Cars_008b\.mat: 1 keypoint\(s\) outside the 300x200 image"):
        _normalize(car_copy)


def test_skip_bad_drops_the_image_and_its_pairs(car_copy):
    (car_copy / "PF-dataset/car(G)/Cars_008b.mat").unlink()
    images, pairs, bad = _normalize(car_copy, skip_bad=True)
    assert len(images) == 9 and "car(G)/Cars_008b" not in {row["image_id"] for row in images}
    assert len(pairs) == 9 * 8
    assert [(Path(item.path).name, item.problem) for item in bad.items] == [
        ("Cars_008b.mat", "annotation .mat file is missing")
    ]
