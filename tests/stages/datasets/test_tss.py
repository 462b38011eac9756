"""The TSS normaliser on the real fixture pairs, and its errors on corrupted copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.catalog import DatasetSpec
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems
from stages.datasets.flo import flow_validity, read_flo, write_flo
from stages.datasets.tss import load_mask, normalize

PAIRS = ("JODS/car_01_02", "JODS/car_03_04", "PASCAL/bike_01_02")


@pytest.fixture(scope="module")
def tss_dir(shared_fixtures: Path) -> Path:
    return shared_fixtures / "tss"


@pytest.fixture(scope="module")
def tables(tss_dir: Path):
    images, pairs = normalize(tss_dir, DatasetSpec(name="tss", kind="tss"), BadItems("tss"))
    return images.to_pylist(), pairs.to_pylist()


@pytest.fixture
def tss_copy(tss_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the fixture's ``TSS_CVPR2016`` tree under ``tmp_path/raw``."""
    raw = tmp_path / "raw"
    for pair in PAIRS:
        target = raw / "TSS_CVPR2016" / pair
        target.mkdir(parents=True)
        for file in (tss_dir / "TSS_CVPR2016" / pair).iterdir():
            shutil.copyfile(file, target / file.name)
    return raw


def _normalize(raw: Path, skip_bad: bool = False, **options):
    bad = BadItems("tss", skip_bad=skip_bad)
    images, pairs = normalize(raw, DatasetSpec(name="tss", kind="tss", options=options), bad)
    return images.to_pylist(), pairs.to_pylist(), bad


def test_three_pairs_give_six_images_and_both_directions(tables):
    images, pairs = tables
    assert [row["image_id"] for row in images] == [f"{p}/image{n}" for p in PAIRS for n in (1, 2)]
    assert [row["pair_id"] for row in pairs] == [f"{p}/{d}" for p in PAIRS for d in ("1to2", "2to1")]
    for forward, backward in zip(pairs[::2], pairs[1::2], strict=True):
        assert forward["group"] == backward["group"] == forward["pair_id"].rsplit("/", 1)[0]
        assert (forward["src_image_id"], forward["trg_image_id"]) == (
            backward["trg_image_id"],
            backward["src_image_id"],
        )
        assert (forward["direction"], backward["direction"]) == ("1to2", "2to1")
        assert forward["flow_path"].endswith("flow1.flo") and backward["flow_path"].endswith("flow2.flo")
        assert forward["src_kps"] == backward["trg_kps"] and forward["trg_kps"] == backward["src_kps"]
    assert {row["split"] for row in pairs} == {"test"}
    assert {row["threshold_kind"] for row in pairs} == {"trg_image"}
    assert {row["dataset"] for row in images + pairs} == {"tss"}
    assert [row["category"] for row in images] == ["JODS"] * 4 + ["PASCAL"] * 2


def test_image_rows_match_the_files(tables, tss_dir):
    images, _ = tables
    for row in images:
        with Image.open(tss_dir / row["path"]) as im:
            assert (row["width"], row["height"]) == im.size
        assert row["mask_path"] == row["path"].replace("image", "mask")
        assert row["bbox"] is None


def test_flow_validity_equals_the_source_mask(tables, tss_dir):
    images, pairs = tables
    by_id = {row["image_id"]: row for row in images}
    for pair in pairs:
        src = by_id[pair["src_image_id"]]
        flow = read_flo(tss_dir / pair["flow_path"])
        mask = load_mask(tss_dir / src["mask_path"])
        assert flow.shape[:2] == mask.shape == (src["height"], src["width"])
        assert 0 < mask.sum() < mask.size
        np.testing.assert_array_equal(flow_validity(flow), mask)


def test_load_mask_reads_palette_indices_not_colours(tss_dir):
    jods = tss_dir / "TSS_CVPR2016/JODS/car_01_02/mask1.png"
    pascal = tss_dir / "TSS_CVPR2016/PASCAL/bike_01_02/mask1.png"
    with Image.open(jods) as im:
        assert im.mode == "P" and set(np.unique(np.asarray(im))) == {0, 1}
    with Image.open(pascal) as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    for path in (jods, pascal):
        mask = load_mask(path)
        assert mask.dtype == bool and mask.any() and not mask.all()


def test_flip_flags_come_from_flip_gt(tables, tss_dir):
    _, pairs = tables
    for pair in pairs:
        text = (tss_dir / "TSS_CVPR2016" / pair["group"] / "flip_gt.txt").read_text().strip()
        assert pair["flip"] is (text == "1")


def test_keypoints_are_corr_txt_in_zero_based_pixels(tables):
    _, pairs = tables
    forward = pairs[0]
    # corr.txt line 1 of JODS/car_01_02: 0.56837 0.72549 0.48789 0.67892; image1 340x212, image2 340x240
    np.testing.assert_allclose(forward["src_kps"][0], [0.56837 * 340 - 1, 0.72549 * 212 - 1])
    np.testing.assert_allclose(forward["src_kps"][0], [192.2458, 152.80388])
    np.testing.assert_allclose(forward["trg_kps"][0], [164.8826, 161.9408])
    assert len(forward["src_kps"]) == 62 and forward["kps_ids"] == list(range(62))


def test_the_flows_carry_the_keypoints_onto_their_partners(tables, tss_dir):
    """The 1-based reading of corr.txt is the one the ground-truth flows agree with."""
    images, pairs = tables
    by_id = {row["image_id"]: row for row in images}

    def median_error(shift: float) -> float:
        errors = []
        for pair in pairs:
            flow = read_flo(tss_dir / pair["flow_path"])
            src = np.array(pair["src_kps"]) + shift
            trg = np.array(pair["trg_kps"]) + shift
            size = (by_id[pair["src_image_id"]]["width"], by_id[pair["src_image_id"]]["height"])
            col, row = np.clip(np.rint(src), 0, np.array(size) - 1).astype(int).T
            valid = flow_validity(flow)[row, col]
            errors.append(np.linalg.norm(src + flow[row, col] - trg, axis=1)[valid])
        return float(np.median(np.concatenate(errors)))

    assert median_error(0.0) < 0.15
    assert median_error(1.0) > 2 * median_error(0.0)  # the plain x * W reading
    assert median_error(0.5) > 1.5 * median_error(0.0)  # the pixel-centre x * W - 0.5 reading
    assert median_error(-0.5) > 1.5 * median_error(0.0)


def test_subsets_option_selects_and_unknown_options_are_rejected(tss_dir):
    _, pairs, _ = _normalize(tss_dir, subsets=["PASCAL"])
    assert [row["pair_id"] for row in pairs] == ["PASCAL/bike_01_02/1to2", "PASCAL/bike_01_02/2to1"]
    with pytest.raises(CatalogError, match=r"datasets\.tss\.options: unknown key\(s\) 'subset'.*subsets"):
        _normalize(tss_dir, subset=["PASCAL"])
    with pytest.raises(CatalogError, match=r"subsets\[0\]: 'Pascal' is not one of"):
        _normalize(tss_dir, subsets=["Pascal"])
    with pytest.raises(DataError, match=r"TSS_CVPR2016: holds none of the subset folders FG3DCar"):
        _normalize(tss_dir, subsets=["FG3DCar"])


def test_missing_root_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"raw/TSS_CVPR2016: folder is missing"):
        _normalize(tmp_path / "raw")


def test_wrong_flo_magic_names_the_file(tss_copy):
    flow = tss_copy / "TSS_CVPR2016/JODS/car_03_04/flow2.flo"
    data = bytearray(flow.read_bytes())
    data[:4] = bytes(4)
    flow.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"car_03_04/flow2\.flo: wrong \.flo magic number"):
        _normalize(tss_copy)


def test_missing_image_names_the_file(tss_copy):
    (tss_copy / "TSS_CVPR2016/PASCAL/bike_01_02/image2.png").unlink()
    with pytest.raises(DataError, match=r"bike_01_02/image2\.png: image file is missing"):
        _normalize(tss_copy)


def test_flow_of_the_wrong_size_names_the_file(tss_copy):
    pair = tss_copy / "TSS_CVPR2016/JODS/car_01_02"
    write_flo(pair / "flow1.flo", read_flo(pair / "flow1.flo")[:-1])
    with pytest.raises(DataError, match=r"car_01_02/flow1\.flo: flow is 340x211 but its source image1\.png is 340x212"):
        _normalize(tss_copy)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("flip_gt.txt", "2\n", r"flip_gt\.txt: expected 0 or 1, got '2'"),
        ("corr.txt", "0.5 0.5 1.5 0.5\n", r"corr\.txt: 1 image2 match\(s\) outside the 340x240 image"),
        ("corr.txt", "0.5 0.5 0.5\n", r"corr\.txt: line 1: expected 4 numbers"),
    ],
)
def test_bad_annotation_files_are_named(tss_copy, name, content, match):
    (tss_copy / "TSS_CVPR2016/JODS/car_01_02" / name).write_text(content)
    with pytest.raises(DataError, match=match):
        _normalize(tss_copy)


def test_skip_bad_records_the_pair_and_keeps_the_rest(tss_copy):
    (tss_copy / "TSS_CVPR2016/JODS/car_03_04/mask1.png").unlink()
    images, pairs, bad = _normalize(tss_copy, skip_bad=True)
    assert [row["image_id"] for row in images] == [
        "JODS/car_01_02/image1",
        "JODS/car_01_02/image2",
        "PASCAL/bike_01_02/image1",
        "PASCAL/bike_01_02/image2",
    ]
    assert len(pairs) == 4 and not any("car_03_04" in row["pair_id"] for row in pairs)
    assert [(Path(item.path).name, item.problem) for item in bad.items] == [("mask1.png", "mask file is missing")]
