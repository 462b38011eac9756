"""SPair-71k normaliser: every column against a synthetic tree in the release's formats; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.catalog import DatasetSpec
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems
from stages.datasets.schema import IMAGES_SCHEMA, PAIRS_SCHEMA
from stages.datasets.spair import normalize
from tests.stages.datasets.synthetic import (
    SPAIR_ROOT,
    Expected,
    spair_pair_ids,
    spair_pair_json,
    write_spair,
)

AEROPLANE_TEST = "000001-2008_000001-2008_000002:aeroplane"
CAT_TEST = "000003-2009_000010-2009_000011:cat"


@pytest.fixture
def spair(tmp_path: Path) -> tuple[Path, Expected]:
    return tmp_path, write_spair(tmp_path, dataset="spair-test")


def run(raw_dir: Path, splits=("test",), bad: BadItems | None = None, **options):
    spec = DatasetSpec(name="spair-test", kind="spair", splits=tuple(splits), options=options)
    return normalize(raw_dir, spec, bad or BadItems("spair-test"))


def edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_test_split_of_the_large_layout_matches_every_written_value(spair):
    raw_dir, expected = spair
    images, pairs = run(raw_dir)
    assert images.schema == IMAGES_SCHEMA and pairs.schema == PAIRS_SCHEMA
    pair_ids = [AEROPLANE_TEST, CAT_TEST]
    assert pairs.to_pylist() == expected.pair_rows(pair_ids)
    assert images.to_pylist() == expected.image_rows(pair_ids)


def test_image_rows_take_bbox_from_the_image_json_and_mask_only_when_present(spair):
    raw_dir, _ = spair
    edit_json(raw_dir / SPAIR_ROOT / "ImageAnnotation/aeroplane/2008_000001.json", bndbox=[5, 5, 30, 25])
    images, pairs = run(raw_dir)
    rows = {row["image_id"]: row for row in images.to_pylist()}
    assert rows["aeroplane/2008_000001"]["bbox"] == [5.0, 5.0, 30.0, 25.0]
    assert rows["aeroplane/2008_000001"]["mask_path"] == "SPair-71k/Segmentation/aeroplane/2008_000001.png"
    # no image JSON: the pair JSON's box; no PNG: no mask
    assert rows["aeroplane/2008_000002"]["bbox"] == [1.0, 2.0, 30.0, 30.0]
    assert rows["aeroplane/2008_000002"]["mask_path"] is None
    assert pairs.to_pylist()[0]["src_bbox"] == [2.0, 3.0, 35.0, 27.0]  # the pair keeps its own box


@pytest.mark.parametrize(
    ("layout", "splits"),
    [("large", ["trn", "val", "test"]), ("small", ["test"]), ("small", ["val", "trn"]), ("large", ["val"])],
)
def test_splits_and_layout_select_the_listed_pairs_in_order(spair, layout, splits):
    raw_dir, expected = spair
    images, pairs = run(raw_dir, splits, layout=layout)
    pair_ids = spair_pair_ids(layout, splits)
    assert pairs.to_pylist() == expected.pair_rows(pair_ids)
    assert images.to_pylist() == expected.image_rows(pair_ids)
    assert set(pairs.column("split").to_pylist()) == set(splits)


def test_integer_kps_ids_are_read_like_digit_strings(spair):
    raw_dir, expected = spair
    edit_json(spair_pair_json(raw_dir, CAT_TEST), kps_ids=[3, 4])
    _, pairs = run(raw_dir)
    assert pairs.to_pylist()[1]["kps_ids"] == [3, 4] == expected.pairs[CAT_TEST]["kps_ids"]


@pytest.mark.parametrize(
    ("options", "splits", "match"),
    [
        (
            {"layuot": "small"},
            ["test"],
            r"datasets\.spair-test\.options: unknown key\(s\) 'layuot'; valid keys are layout",
        ),
        ({"layout": "medium"}, ["test"], r"options\.layout: 'medium' is not one of 'large', 'small'"),
        (
            {},
            ["train"],
            r"datasets\.spair-test\.splits: unknown split\(s\) \['train'\]; valid: trn, val, test",
        ),
    ],
)
def test_bad_options_and_splits_are_catalog_errors(spair, options, splits, match):
    raw_dir, _ = spair
    with pytest.raises(CatalogError, match=match):
        run(raw_dir, splits, **options)


def test_a_missing_layout_file_names_it(spair):
    raw_dir, _ = spair
    (raw_dir / SPAIR_ROOT / "Layout/small/val.txt").unlink()
    with pytest.raises(DataError, match=r"Layout/small/val\.txt: the pair list of split 'val' \(layout 'small'\)"):
        run(raw_dir, ["val"], layout="small")


def break_trg_bndbox(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), trg_bndbox=[1, 2, 30])


def break_src_kps_shape(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), src_kps=[[3, 4, 5], [20, 15], [34, 26]])


def break_imsize(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), src_imsize=[40, 30])


def drop_field(raw_dir: Path) -> None:
    path = spair_pair_json(raw_dir, AEROPLANE_TEST)
    data = json.loads(path.read_text())
    del data["occlusion"]
    path.write_text(json.dumps(data))


def move_keypoint_outside(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), trg_kps=[[2, 3], [18, 20], [29, 40]])


def drop_a_kps_id(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), kps_ids=["0", "7"])


def declare_a_wrong_size(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), trg_imsize=[37, 32, 3])


def delete_pair_json(raw_dir: Path) -> None:
    spair_pair_json(raw_dir, AEROPLANE_TEST).unlink()


def corrupt_pair_json(raw_dir: Path) -> None:
    spair_pair_json(raw_dir, AEROPLANE_TEST).write_text('{"pair_id": 1,')


def bad_variation_flag(raw_dir: Path) -> None:
    edit_json(spair_pair_json(raw_dir, AEROPLANE_TEST), viewpoint_variation=3)


PAIR_JSON = r"PairAnnotation/test/000001-2008_000001-2008_000002:aeroplane\.json: "


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (break_trg_bndbox, PAIR_JSON + r"trg_bndbox: expected a list of 4 numbers, got \[1, 2, 30\]"),
        (break_src_kps_shape, PAIR_JSON + r"src_kps: expected a list of \[x, y\] number pairs"),
        (break_imsize, PAIR_JSON + r"src_imsize: expected a list of 3 numbers, got \[40, 30\]"),
        (drop_field, PAIR_JSON + r"field 'occlusion' is missing"),
        (
            move_keypoint_outside,
            PAIR_JSON + r"1 trg_kps keypoint\(s\) outside the 36x32 image, e\.g\. \(29\.0, 40\.0\)",
        ),
        (
            drop_a_kps_id,
            PAIR_JSON + r"src_kps, trg_kps and kps_ids must have the same length, got 3, 3 and 2",
        ),
        (declare_a_wrong_size, PAIR_JSON + r"trg_imsize says 37x32 but .*2008_000002\.jpg is 36x32"),
        (delete_pair_json, PAIR_JSON + r"annotation file is missing"),
        (corrupt_pair_json, PAIR_JSON + r"not valid JSON"),
        (bad_variation_flag, PAIR_JSON + r"viewpoint_variation: expected an integer from 0 to 2, got 3"),
    ],
)
def test_a_malformed_pair_json_is_a_data_error_naming_file_and_field(spair, damage, match):
    raw_dir, _ = spair
    damage(raw_dir)
    with pytest.raises(DataError, match=match):
        run(raw_dir)


def test_a_missing_image_is_a_data_error_naming_it(spair):
    raw_dir, _ = spair
    (raw_dir / SPAIR_ROOT / "JPEGImages/cat/2009_000011.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/cat/2009_000011\.jpg: image file is missing"):
        run(raw_dir)


def test_an_image_json_disagreeing_with_the_jpeg_is_a_data_error(spair):
    raw_dir, _ = spair
    edit_json(raw_dir / SPAIR_ROOT / "ImageAnnotation/cat/2009_000010.json", image_height=41)
    with pytest.raises(DataError, match=r"2009_000010\.json: image_height: 41 differs from the size of .*\(30x40\)"):
        run(raw_dir)


def test_skip_bad_records_bad_items_and_keeps_the_rest(spair):
    raw_dir, expected = spair
    break_trg_bndbox(raw_dir)
    (raw_dir / SPAIR_ROOT / "JPEGImages/cat/2009_000011.jpg").unlink()
    bad = BadItems("spair-test", skip_bad=True)
    images, pairs = run(raw_dir, ["trn", "val", "test"], bad)
    # the trn pair is intact; the val and test cat pairs need the missing image
    assert pairs.to_pylist() == expected.pair_rows(["000002-2008_000002-2008_000001:aeroplane"])
    assert images.to_pylist() == expected.image_rows(["000002-2008_000002-2008_000001:aeroplane"])
    problems = [(Path(item.path).name, item.problem) for item in bad.items]
    assert problems[0] == (
        f"{AEROPLANE_TEST}.json",
        "trg_bndbox: expected a list of 4 numbers, got [1, 2, 30]",
    )
    assert problems[1] == ("2009_000011.jpg", "image file is missing")
    assert sorted(problems[2:]) == [
        (f"{CAT_TEST}.json", "skipped: its trg image cat/2009_000011 is malformed (reported on its own)"),
        (
            "000004-2009_000011-2009_000010:cat.json",
            "skipped: its src image cat/2009_000011 is malformed (reported on its own)",
        ),
    ]
    assert bad.rows()[0]["dataset"] == "spair-test"
