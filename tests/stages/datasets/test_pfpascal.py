"""PF-PASCAL normaliser: every column against a synthetic tree in the release's formats; bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.catalog import DatasetSpec
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems
from stages.datasets.pfpascal import normalize, read_annotation
from stages.datasets.schema import IMAGES_SCHEMA, PAIRS_SCHEMA
from tests.stages.datasets.synthetic import (
    PFPASCAL_ROWS,
    Expected,
    pfpascal_csv_row,
    pfpascal_image_path,
    pfpascal_mat,
    pfpascal_pair_ids,
    write_pfpascal,
    write_pfpascal_csv,
)


@pytest.fixture
def pfpascal(tmp_path: Path) -> tuple[Path, Expected]:
    return tmp_path, write_pfpascal(tmp_path, dataset="pfp")


def run(raw_dir: Path, splits=("test",), bad: BadItems | None = None, **options):
    spec = DatasetSpec(name="pfp", kind="pf-pascal", splits=tuple(splits), options=options)
    return normalize(raw_dir, spec, bad or BadItems("pfp"))


def rewrite_test_csv(raw_dir: Path, rows: list[list[str]]) -> None:
    write_pfpascal_csv(raw_dir / "test_pairs_pf_pascal.csv", rows)


def release_rows(split: str = "test") -> list[list[str]]:
    return [pfpascal_csv_row(*row) for row in PFPASCAL_ROWS[split]]


def test_test_split_matches_every_written_value_and_ignores_macos_junk(pfpascal):
    raw_dir, expected = pfpascal
    images, pairs = run(raw_dir)
    assert images.schema == IMAGES_SCHEMA and pairs.schema == PAIRS_SCHEMA
    pair_ids = pfpascal_pair_ids(["test"])
    assert pairs.to_pylist() == expected.pair_rows(pair_ids)
    assert images.to_pylist() == expected.image_rows(pair_ids)


def test_keypoints_are_those_finite_in_both_lists_and_ids_their_positions(pfpascal):
    raw_dir, _ = pfpascal
    _, pairs = run(raw_dir)
    first = pairs.to_pylist()[0]
    # XA = 5;10;nan;20;30 and XB = 4;nan;15;22;33.5: positions 0, 3 and 4 are finite in both
    assert first["kps_ids"] == [0, 3, 4]
    assert first["src_kps"] == [[5.0, 6.0], [20.0, 8.0], [30.0, 20.0]]
    assert first["trg_kps"] == [[4.0, 5.0], [22.0, 10.0], [33.5, 25.0]]
    assert first["src_bbox"] == [3.0, 2.0, 36.0, 28.0] and first["threshold_kind"] == "trg_image"


def test_a_repeated_pair_gets_its_row_index_and_ids_are_unique(pfpascal):
    raw_dir, _ = pfpascal
    _, pairs = run(raw_dir, ["test", "val", "all"])
    pair_ids = pairs.column("pair_id").to_pylist()
    assert len(set(pair_ids)) == len(pair_ids) == 10
    assert pair_ids[:4] == [
        "test/2009_003129-2010_000001/0000",
        "test/2008_000100-2008_000200",
        "test/2009_003129-2010_000001/0002",
        "test/2010_000001-2009_003129",
    ]


@pytest.mark.parametrize("splits", [["val"], ["all"], ["val", "test"], ["test", "val", "all"]])
def test_splits_select_their_csv(pfpascal, splits):
    raw_dir, expected = pfpascal
    images, pairs = run(raw_dir, splits)
    pair_ids = pfpascal_pair_ids(splits)
    assert pairs.to_pylist() == expected.pair_rows(pair_ids)
    assert images.to_pylist() == expected.image_rows(pair_ids)


def test_a_csv_without_header_row_is_read_from_its_first_line(pfpascal):
    raw_dir, expected = pfpascal
    (raw_dir / "val_pairs_pf_pascal.csv").write_text(",".join(release_rows("val")[0]) + "\n")
    _, pairs = run(raw_dir, ["val"])
    assert pairs.to_pylist() == expected.pair_rows(pfpascal_pair_ids(["val"]))


@pytest.mark.parametrize(
    ("options", "splits", "match"),
    [
        ({"layout": "large"}, ["test"], r"datasets\.pfp\.options: unknown key\(s\) 'layout'"),
        ({}, ["trn"], r"datasets\.pfp\.splits: unknown split\(s\) \['trn'\]; valid: test, val, all"),
    ],
)
def test_options_and_unknown_splits_are_catalog_errors(pfpascal, options, splits, match):
    raw_dir, _ = pfpascal
    with pytest.raises(CatalogError, match=match):
        run(raw_dir, splits, **options)


def test_a_missing_pair_list_names_it(pfpascal):
    raw_dir, _ = pfpascal
    (raw_dir / "val_pairs_pf_pascal.csv").unlink()
    with pytest.raises(DataError, match=r"val_pairs_pf_pascal\.csv: the pair list of split 'val' is missing"):
        run(raw_dir, ["val"])


def test_read_annotation_returns_kps_with_nan_rows_and_the_box(pfpascal):
    raw_dir, _ = pfpascal
    kps, bbox = read_annotation(pfpascal_mat(raw_dir, "2008_000100"))
    np.testing.assert_array_equal(kps, [[2, 3], [12, 30], [np.nan, np.nan]])
    assert bbox == [0.0, 1.0, 29.0, 39.0]


def test_a_mat_without_kps_is_a_data_error_naming_it(pfpascal):
    raw_dir, _ = pfpascal
    mat = pfpascal_mat(raw_dir, "2010_000001")
    scipy.io.savemat(mat, {"bbox": np.array([[1.0, 1, 35, 31]])})
    with pytest.raises(
        DataError, match=r"Annotations/aeroplane/2010_000001\.mat: no 'kps' variable \(found \['bbox'\]\)"
    ):
        run(raw_dir)


def test_an_unreadable_mat_is_a_data_error_naming_it(pfpascal):
    raw_dir, _ = pfpascal
    pfpascal_mat(raw_dir, "2010_000001").write_bytes(b"not a mat file at all, just text" * 8)
    with pytest.raises(DataError, match=r"2010_000001\.mat: not a readable \.mat file"):
        run(raw_dir)


def test_a_missing_image_is_a_data_error_naming_it(pfpascal):
    raw_dir, _ = pfpascal
    (raw_dir / pfpascal_image_path("2008_000200")).unlink()
    with pytest.raises(DataError, match=r"JPEGImages/2008_000200\.jpg: image file is missing"):
        run(raw_dir)


def mismatched_counts(rows: list[list[str]]) -> None:
    rows[1][6] = rows[1][6] + ";7"  # YB one longer than XB


def source_target_counts(rows: list[list[str]]) -> None:
    rows[1][5], rows[1][6] = rows[1][5] + ";1", rows[1][6] + ";1"


def keypoint_outside(rows: list[list[str]]) -> None:
    rows[1][3] = "2;45;nan"  # the source image is 30 pixels wide


def keypoint_off_the_mat(rows: list[list[str]]) -> None:
    rows[1][3] = "2;14;nan"  # the .mat says x = 12


def not_a_number(rows: list[list[str]]) -> None:
    rows[1][4] = "3;thirty;nan"


def class_out_of_range(rows: list[list[str]]) -> None:
    rows[1][2] = "21"


def too_few_columns(rows: list[list[str]]) -> None:
    del rows[1][6]


def class_conflict(rows: list[list[str]]) -> None:
    rows[3][2] = "12"  # 2010_000001 was an aeroplane on line 2


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (mismatched_counts, r"line 3: target has 3 x values \(XB\) but 4 y values \(YB\)"),
        (source_target_counts, r"line 3: the source has 3 keypoints \(XA, YA\) but the target 4 \(XB, YB\)"),
        (
            keypoint_outside,
            r"line 3: source keypoints \(XA, YA\) of PF-dataset-PASCAL/JPEGImages/2008_000100\.jpg: "
            r"1 keypoint\(s\) outside the 30x40 image, e\.g\. \(45\.0, 30\.0\)",
        ),
        (
            keypoint_off_the_mat,
            r"line 3: source keypoints \(XA, YA\): \(14, 30\) is 2 px from every keypoint of "
            r"PF-dataset-PASCAL/Annotations/dog/2008_000100\.mat \(tolerance 1\.0 px\)",
        ),
        (not_a_number, r"line 3: YA is not a ';'-separated list of numbers: '3;thirty;nan'"),
        (class_out_of_range, r"line 3: class should be an integer from 1 to 20, got '21'"),
        (
            too_few_columns,
            r"line 3: expected 7 columns \(source image, target image, class, XA, YA, XB, YB\), got 6",
        ),
        (class_conflict, r"line 5: image 2010_000001 has class dog here but aeroplane earlier"),
    ],
)
def test_a_malformed_csv_row_is_a_data_error_naming_file_and_line(pfpascal, damage, match):
    raw_dir, _ = pfpascal
    rows = release_rows()
    damage(rows)
    rewrite_test_csv(raw_dir, rows)
    with pytest.raises(DataError, match=r"test_pairs_pf_pascal\.csv: " + match):
        run(raw_dir)


def test_skip_bad_records_bad_items_and_keeps_the_rest(pfpascal):
    raw_dir, expected = pfpascal
    rows = release_rows()
    mismatched_counts(rows)
    rewrite_test_csv(raw_dir, rows)
    scipy.io.savemat(pfpascal_mat(raw_dir, "2010_000001"), {"bbox": np.array([[1.0, 1, 35, 31]])})
    bad = BadItems("pfp", skip_bad=True)
    images, pairs = run(raw_dir, ["test", "val"], bad)
    # line 3 is malformed, and every other test row needs 2010_000001, whose .mat has no kps
    assert pairs.to_pylist() == expected.pair_rows(["val/2008_000200-2008_000100"])
    assert images.to_pylist() == expected.image_rows(["val/2008_000200-2008_000100"])
    problems = [(Path(item.path).name, item.problem) for item in bad.items]
    assert problems[0] == (
        "test_pairs_pf_pascal.csv",
        "line 3: target has 3 x values (XB) but 4 y values (YB)",
    )
    assert problems[1] == ("2010_000001.mat", "no 'kps' variable (found ['bbox'])")
    assert [problem.split(": ", 1)[1] for _, problem in problems[2:]] == [
        "skipped: its target image 2010_000001 is malformed (reported on its own)",
        "skipped: its target image 2010_000001 is malformed (reported on its own)",
        "skipped: its source image 2010_000001 is malformed (reported on its own)",
    ]
