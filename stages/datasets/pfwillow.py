"""PF-WILLOW (Ham et al., Proposal Flow): normalise images, ``.mat`` keypoints and pair list into the tables.

Layout: ``PF-dataset/<class>/<name>.png`` with ``<name>.mat`` holding ``pts_coord`` (2 x 10: row 0 = x,
row 1 = y, pixels); a repack names the folder ``PF-dataset-WILLOW``. Keypoints always come from the
``.mat`` files. The pairs come from ``test_pairs_pf.csv`` (next to the image folder, or inside it) when it is
there: a header row, then per row imageA, imageB (``PF-dataset/<class>/<name>.png``), the 10 x then the 10 y
of A, the 10 x then the 10 y of B. Each row's coordinates must agree with the ``.mat`` files within
``CSV_TOLERANCE_PX``, so a csv that does not belong to these annotations is refused rather than mixed in.
Without the csv, the pairs are every ordered pair of distinct images within a class (the all-pairs
protocol), also labelled split ``test``.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.io
from scipy.io.matlab import MatReadError

from pipeline.catalog import DatasetSpec
from pipeline.config import from_mapping
from pipeline.errors import DataError
from stages.datasets.common import BadItems, as_points, check_points_inside, image_size
from stages.datasets.schema import images_table, pairs_table

ROOT_NAMES = ("PF-dataset", "PF-dataset-WILLOW")  # the official zip's folder, and a common repack's
PAIRS_CSV = "test_pairs_pf.csv"
N_KPS = 10
# Largest allowed |csv - .mat| per coordinate: room for printing precision, none for a 1-pixel shift.
CSV_TOLERANCE_PX = 0.5


@dataclass(frozen=True)
class Options:
    """PF-WILLOW options in the catalog.

    ``pairs``: ``auto`` uses the csv when it is present and all pairs otherwise; ``csv`` requires the csv;
    ``all`` ignores it.
    """

    pairs: Literal["auto", "csv", "all"] = "auto"


@dataclass(frozen=True)
class _Image:
    """One annotated image: its table row and its [10, 2] keypoints."""

    row: dict
    kps: np.ndarray


def read_keypoints(mat_path: Path) -> np.ndarray:
    """The [10, 2] ``(x, y)`` keypoints of a PF-WILLOW ``.mat`` (its ``pts_coord``, 2 x 10)."""
    if not mat_path.is_file():
        raise DataError(mat_path, "annotation .mat file is missing")
    try:
        mat = scipy.io.loadmat(mat_path)
    except MatReadError as exc:
        raise DataError(mat_path, f"not a readable .mat file ({exc})") from exc
    if "pts_coord" not in mat:
        keys = sorted(key for key in mat if not key.startswith("__"))
        raise DataError(mat_path, f"no 'pts_coord' variable (found {keys})")
    coords = mat["pts_coord"]
    if not np.issubdtype(coords.dtype, np.number) or coords.shape != (2, N_KPS):
        raise DataError(
            mat_path, f"'pts_coord' should be a 2 x {N_KPS} numeric array, got {coords.dtype} {coords.shape}"
        )
    return coords.T.astype(np.float64)


def _find_root(raw_dir: Path) -> Path:
    """The image folder under ``raw_dir``, under either of its names."""
    for name in ROOT_NAMES:
        if (raw_dir / name).is_dir():
            return raw_dir / name
    raise DataError(raw_dir, f"no image folder: expected {' or '.join(ROOT_NAMES)}/<class>/<name>.png (PF-dataset.zip)")


def _find_csv(raw_dir: Path, root: Path, wanted: str) -> Path | None:
    """The pair list to use (``wanted`` is ``Options.pairs``), or None for the all-pairs protocol."""
    if wanted == "all":
        return None
    found = [path for path in (raw_dir / PAIRS_CSV, root / PAIRS_CSV) if path.is_file()]
    if len(found) > 1:
        raise DataError(raw_dir, f"two pair lists {found[0]} and {found[1]}; keep one")
    if wanted == "csv" and not found:
        raise DataError(raw_dir / PAIRS_CSV, "pair list is missing (options.pairs is 'csv'); download it or set 'auto'")
    return found[0] if found else None


def _read_image(png: Path, raw_dir: Path) -> _Image:
    width, height = image_size(png)
    mat_path = png.with_suffix(".mat")
    kps = read_keypoints(mat_path)
    check_points_inside(kps, width, height, mat_path)
    category = png.parent.name
    row = {
        "image_id": f"{category}/{png.stem}",
        "category": category,
        "path": png.relative_to(raw_dir).as_posix(),
        "width": width,
        "height": height,
    }
    return _Image(row, kps)


def _pair_row(src: _Image, trg: _Image) -> dict:
    src_name = src.row["image_id"].split("/")[1]
    trg_name = trg.row["image_id"].split("/")[1]
    return {
        "pair_id": f"{src.row['category']}/{src_name}-{trg_name}",
        "split": "test",
        "category": src.row["category"],
        "src_image_id": src.row["image_id"],
        "trg_image_id": trg.row["image_id"],
        "src_kps": as_points(src.kps),
        "trg_kps": as_points(trg.kps),
        "kps_ids": list(range(N_KPS)),
        "threshold_kind": "trg_kps",
    }


def _all_pairs(images: dict[str, _Image]) -> list[dict]:
    """Every ordered pair of distinct images of the same class."""
    by_class: dict[str, list[_Image]] = {}
    for image in images.values():
        by_class.setdefault(image.row["category"], []).append(image)
    return [_pair_row(src, trg) for members in by_class.values() for src, trg in itertools.permutations(members, 2)]


def _parses_as_float(text: str) -> bool:
    """A CSV cell that ``float()`` reads (a header cell does not)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_image(field: str, images: dict[str, _Image], where: str, csv_path: Path) -> _Image:
    """The image a csv path such as ``PF-dataset/car(G)/Cars_006a.png`` names, whichever the folder's name."""
    parts = PurePosixPath(field.strip()).parts
    image_id = "/".join((parts[-2], PurePosixPath(parts[-1]).stem)) if len(parts) >= 2 else field
    if image_id not in images:
        raise DataError(csv_path, f"{where}: image {field!r} is not among the dataset's (valid) images")
    return images[image_id]


def _csv_pair(fields: list[str], images: dict[str, _Image], where: str, csv_path: Path) -> dict:
    """One csv row -> a pair row, after checking its coordinates against the ``.mat`` keypoints."""
    if len(fields) != 2 + 4 * N_KPS:
        raise DataError(csv_path, f"{where}: expected {2 + 4 * N_KPS} fields, got {len(fields)}")
    src = _csv_image(fields[0], images, where, csv_path)
    trg = _csv_image(fields[1], images, where, csv_path)
    if src.row["category"] != trg.row["category"]:
        raise DataError(csv_path, f"{where}: pairs {src.row['image_id']} with another class's {trg.row['image_id']}")
    try:
        coords = np.array([float(v) for v in fields[2:]]).reshape(2, 2, N_KPS)  # [image, x|y, K]
    except ValueError as exc:
        raise DataError(csv_path, f"{where}: a coordinate is not a number ({exc})") from None
    for image, xy in ((src, coords[0]), (trg, coords[1])):
        gap = np.abs(xy.T - image.kps).max()
        if not gap <= CSV_TOLERANCE_PX:  # written so that a NaN coordinate fails too
            raise DataError(
                csv_path,
                f"{where}: keypoints of {image.row['image_id']} differ from its .mat by up to {gap:.3g} px "
                f"(tolerance {CSV_TOLERANCE_PX} px)",
            )
    return _pair_row(src, trg)


def _csv_pairs(csv_path: Path, images: dict[str, _Image], bad: BadItems) -> list[dict]:
    """The pairs the csv lists, each row checked under ``bad``; a repeated pair is an error."""
    with csv_path.open(newline="") as f:
        rows = [(line, fields) for line, fields in enumerate(csv.reader(f), start=1) if fields]
    if rows and len(rows[0][1]) > 2 and not _parses_as_float(rows[0][1][2]):
        rows = rows[1:]
    if not rows:
        raise DataError(csv_path, "the pair list has no rows")
    pairs = []
    line_of: dict[str, int] = {}
    for line, fields in rows:
        with bad.guard(csv_path):
            pair = _csv_pair(fields, images, f"line {line}", csv_path)
            if pair["pair_id"] in line_of:
                raise DataError(csv_path, f"line {line} repeats the pair of line {line_of[pair['pair_id']]}")
            line_of[pair["pair_id"]] = line
            pairs.append(pair)
    return pairs


def normalize(raw_dir: Path, spec: DatasetSpec, bad: BadItems) -> tuple[pa.Table, pa.Table]:
    """Normalise PF-WILLOW under ``raw_dir`` into ``(images, pairs)``; pairs from the csv or all pairs.

    A malformed image or ``.mat`` (or csv row) raises a DataError naming the file, or is recorded in
    ``bad`` and skipped together with the pairs that need it.
    """
    raw_dir = Path(raw_dir)
    options = from_mapping(Options, spec.options, f"datasets.{spec.name}.options")
    root = _find_root(raw_dir)
    csv_path = _find_csv(raw_dir, root, options.pairs)
    pngs = sorted(
        png
        for class_dir in root.iterdir()
        if class_dir.is_dir() and not class_dir.name.startswith((".", "__"))
        for png in class_dir.glob("*.png")
    )
    if not pngs:
        raise DataError(root, "no images: expected <class>/<name>.png with <name>.mat")
    images: dict[str, _Image] = {}
    for png in pngs:
        with bad.guard(png.with_suffix(".mat")):
            image = _read_image(png, raw_dir)
            images[image.row["image_id"]] = image
    pair_rows = _csv_pairs(csv_path, images, bad) if csv_path else _all_pairs(images)
    image_rows = [image.row for image in images.values()]
    for row in (*image_rows, *pair_rows):
        row["dataset"] = spec.name
    image_rows.sort(key=lambda row: row["image_id"])
    pair_rows.sort(key=lambda row: row["pair_id"])
    return images_table(image_rows), pairs_table(pair_rows)
