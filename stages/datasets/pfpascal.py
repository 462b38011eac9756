"""PF-PASCAL (Ham et al., Proposal Flow): normalise the CNNGeometric pair lists and ``.mat`` files to tables.

Layout under the raw folder: ``PF-dataset-PASCAL/JPEGImages/<voc id>.jpg`` (flat) and
``PF-dataset-PASCAL/Annotations/<class>/<voc id>.mat`` holding ``kps`` (N x 2 ``[x, y]``, NaN rows for absent
keypoints) and ``bbox`` (1 x 4 ``[x1, y1, x2, y2]``); beside the folder the pair lists
``<split>_pairs_pf_pascal.csv`` for the splits ``test``, ``val`` and ``all``. A csv is read by position after
its header row: source image, target image (paths relative to the raw folder), class (1-based, VOC order),
then XA, YA, XB, YB, each a ';'-separated list of coordinates. A pair's keypoints are the positions finite in
both lists, and ``kps_ids`` are those positions. Every finite csv keypoint must lie within
``MAT_TOLERANCE_PX`` of a keypoint of the image's ``.mat`` when there is one; the ``.mat`` also gives the
boxes. PCK uses the target image's size. Ids: an image is its VOC id; a pair ``<split>/<src id>-<trg id>``,
with ``/<row index:04d>`` (0-based, after the header) appended when the csv lists the same pair twice.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import scipy.io
from scipy.io.matlab import MatReadError

from pipeline.catalog import DatasetSpec
from pipeline.config import from_mapping
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems, as_points, check_points_inside, image_size
from stages.datasets.schema import images_table, pairs_table

ROOT = "PF-dataset-PASCAL"
SPLIT_FILES = {
    "test": "test_pairs_pf_pascal.csv",
    "val": "val_pairs_pf_pascal.csv",
    "all": "all_pairs_pf_pascal.csv",
}
# The csv's class column indexes this list from 1 (PASCAL VOC order).
CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CSV_COLUMNS = ("source image", "target image", "class", "XA", "YA", "XB", "YB")
# Largest allowed distance (per coordinate) between a csv keypoint and its .mat keypoint: room for
# rounding and a 0/1-based origin, not for another image's annotation.
MAT_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Options:
    """PF-PASCAL takes no options; an empty dataclass so that any option given is rejected."""


@dataclass(frozen=True)
class _Row:
    """One parsed csv row: the images it pairs and their keypoints, [K, 2] with NaN where absent."""

    split: str
    index: int  # 0-based data row, after the header
    line: int  # 1-based line of the file, for messages
    csv_path: Path
    category: str
    src: str  # VOC id
    trg: str
    src_pts: np.ndarray
    trg_pts: np.ndarray


@dataclass(frozen=True)
class _Image:
    """One image: its table row and, when it has a ``.mat``, its [N, 2] keypoints (NaN rows absent)."""

    row: dict
    mat_kps: np.ndarray | None
    mat_rel: str | None


def read_annotation(mat_path: Path) -> tuple[np.ndarray, list[float]]:
    """``(kps [N, 2] with NaN rows, bbox [x1, y1, x2, y2])`` of a PF-PASCAL ``.mat``; DataError names it."""
    try:
        mat = scipy.io.loadmat(mat_path)
    except (MatReadError, ValueError, OSError) as exc:
        raise DataError(mat_path, f"not a readable .mat file ({exc})") from None
    found = sorted(key for key in mat if not key.startswith("__"))
    for key in ("kps", "bbox"):
        if key not in mat:
            raise DataError(mat_path, f"no {key!r} variable (found {found})")
    kps, bbox = mat["kps"], mat["bbox"]
    if not np.issubdtype(kps.dtype, np.number) or kps.ndim != 2 or kps.shape[1] != 2:
        raise DataError(mat_path, f"'kps' should be an N x 2 numeric array, got {kps.dtype} {kps.shape}")
    if not np.issubdtype(bbox.dtype, np.number) or bbox.size != 4:
        raise DataError(mat_path, f"'bbox' should be 1 x 4 numbers [x1, y1, x2, y2], got {bbox.dtype} {bbox.shape}")
    return kps.astype(np.float64), [float(v) for v in bbox.ravel()]


def _image_path(field: str, where: str, csv_path: Path) -> PurePosixPath:
    path = PurePosixPath(field.strip())
    if path.is_absolute() or ".." in path.parts or path.suffix.lower() != ".jpg":
        raise DataError(csv_path, f"{where}: expected an image path such as {ROOT}/JPEGImages/<id>.jpg, got {field!r}")
    return path


def _coordinates(text: str, column: str, where: str, csv_path: Path) -> np.ndarray:
    """A ';'-separated list of coordinates; ``nan`` marks an absent keypoint."""
    tokens = [token.strip() for token in text.split(";")]
    if tokens and not tokens[-1]:  # a trailing ';'
        tokens.pop()
    try:
        values = np.array([float(token) for token in tokens], dtype=np.float64)
    except ValueError:
        raise DataError(csv_path, f"{where}: {column} is not a ';'-separated list of numbers: {text!r}") from None
    if np.isinf(values).any():
        raise DataError(csv_path, f"{where}: {column} holds an infinite coordinate: {text!r}")
    return values


def _parse_row(fields: list[str], split: str, index: int, line: int, csv_path: Path) -> tuple[_Row, dict]:
    """One csv row -> (the row, ``{voc id: image path}`` of its two images)."""
    where = f"line {line}"
    if len(fields) < len(CSV_COLUMNS):
        raise DataError(
            csv_path,
            f"{where}: expected {len(CSV_COLUMNS)} columns ({', '.join(CSV_COLUMNS)}), got {len(fields)}",
        )
    src_path = _image_path(fields[0], where, csv_path)
    trg_path = _image_path(fields[1], where, csv_path)
    class_field = fields[2].strip()
    if not class_field.isdigit() or not 1 <= int(class_field) <= len(CLASSES):
        raise DataError(csv_path, f"{where}: class should be an integer from 1 to {len(CLASSES)}, got {fields[2]!r}")
    xa, ya, xb, yb = (_coordinates(fields[i], CSV_COLUMNS[i], where, csv_path) for i in range(3, 7))
    for role, (x, y), (x_name, y_name) in (
        ("source", (xa, ya), ("XA", "YA")),
        ("target", (xb, yb), ("XB", "YB")),
    ):
        if len(x) != len(y):
            raise DataError(
                csv_path, f"{where}: {role} has {len(x)} x values ({x_name}) but {len(y)} y values ({y_name})"
            )
    if len(xa) != len(xb):
        raise DataError(
            csv_path,
            f"{where}: the source has {len(xa)} keypoints (XA, YA) but the target {len(xb)} (XB, YB)",
        )
    row = _Row(
        split=split,
        index=index,
        line=line,
        csv_path=csv_path,
        category=CLASSES[int(class_field) - 1],
        src=src_path.stem,
        trg=trg_path.stem,
        src_pts=np.stack([xa, ya], axis=1),
        trg_pts=np.stack([xb, yb], axis=1),
    )
    return row, {src_path.stem: src_path, trg_path.stem: trg_path}


def _read_csv(csv_path: Path, split: str, bad: BadItems) -> tuple[list[_Row], dict[str, PurePosixPath]]:
    """The rows of one pair list (each checked under ``bad``) and the image paths they name."""
    if not csv_path.is_file():
        raise DataError(csv_path, f"the pair list of split {split!r} is missing")
    with csv_path.open(newline="") as f:
        lines = [(line, fields) for line, fields in enumerate(csv.reader(f), start=1) if any(fields)]
    if lines and len(lines[0][1]) > 2 and not lines[0][1][2].strip().isdigit():
        lines = lines[1:]  # the header row
    rows, paths = [], {}
    for index, (line, fields) in enumerate(lines):
        with bad.guard(csv_path):
            row, row_paths = _parse_row(fields, split, index, line, csv_path)
            for voc_id, path in row_paths.items():
                if paths.setdefault(voc_id, path) != path:
                    raise DataError(csv_path, f"line {line}: image id {voc_id} names both {paths[voc_id]} and {path}")
            rows.append(row)
    return rows, paths


def _read_image(raw_dir: Path, path: PurePosixPath, category: str) -> _Image:
    """An image's row (size from its header, bbox from its ``.mat`` when present) and ``.mat`` keypoints."""
    width, height = image_size(raw_dir / path)
    mat_rel = f"{ROOT}/Annotations/{category}/{path.stem}.mat"
    kps, bbox = read_annotation(raw_dir / mat_rel) if (raw_dir / mat_rel).is_file() else (None, None)
    row = {
        "image_id": path.stem,
        "category": category,
        "path": path.as_posix(),
        "width": width,
        "height": height,
        "bbox": bbox,
    }
    return _Image(row, kps, mat_rel if kps is not None else None)


def _checked_points(row: _Row, role: str, image: _Image | None, raw_dir: Path) -> np.ndarray:
    """``row``'s keypoints of one image after checking them against that image's size and ``.mat``."""
    points = row.src_pts if role == "source" else row.trg_pts
    columns = "XA, YA" if role == "source" else "XB, YB"
    where = f"line {row.line}: {role} keypoints ({columns})"
    if image is None:
        voc_id = row.src if role == "source" else row.trg
        raise DataError(
            row.csv_path,
            f"line {row.line}: skipped: its {role} image {voc_id} is malformed (reported on its own)",
        )
    given = points[np.isfinite(points).all(axis=1)]
    try:
        check_points_inside(given, image.row["width"], image.row["height"], raw_dir / image.row["path"])
    except DataError as exc:
        raise DataError(row.csv_path, f"{where} of {image.row['path']}: {exc.problem}") from None
    if image.mat_kps is not None and len(given):
        annotated = image.mat_kps[np.isfinite(image.mat_kps).all(axis=1)]
        gap = (
            np.abs(given[:, None, :] - annotated[None]).max(axis=2).min(axis=1)
            if len(annotated)
            else np.full(len(given), np.inf)
        )
        worst = int(np.argmax(gap))
        if gap[worst] > MAT_TOLERANCE_PX:
            x, y = given[worst]
            raise DataError(
                row.csv_path,
                f"{where}: ({x:g}, {y:g}) is {gap[worst]:.3g} px from every keypoint of {image.mat_rel} "
                f"(tolerance {MAT_TOLERANCE_PX} px)",
            )
    return points


def _pair_row(row: _Row, pair_id: str, images: dict[str, _Image], raw_dir: Path) -> dict:
    src_pts = _checked_points(row, "source", images.get(row.src), raw_dir)
    trg_pts = _checked_points(row, "target", images.get(row.trg), raw_dir)
    kps_ids = np.flatnonzero(np.isfinite(src_pts).all(axis=1) & np.isfinite(trg_pts).all(axis=1))
    return {
        "pair_id": pair_id,
        "split": row.split,
        "category": row.category,
        "src_image_id": row.src,
        "trg_image_id": row.trg,
        "src_kps": as_points(src_pts[kps_ids]),
        "trg_kps": as_points(trg_pts[kps_ids]),
        "kps_ids": kps_ids.tolist(),
        "threshold_kind": "trg_image",
        "src_bbox": images[row.src].row["bbox"],
        "trg_bbox": images[row.trg].row["bbox"],
    }


def _pair_ids(rows: list[_Row]) -> list[str]:
    """``<split>/<src>-<trg>``, plus ``/<row index:04d>`` for a pair its csv lists more than once."""
    bases = [f"{row.split}/{row.src}-{row.trg}" for row in rows]
    counts = Counter(bases)
    return [base if counts[base] == 1 else f"{base}/{row.index:04d}" for base, row in zip(bases, rows, strict=True)]


def _categories(rows: list[_Row], bad: BadItems) -> tuple[list[_Row], dict[str, str]]:
    """Each image's class; a row giving an image another class than an earlier row is a bad item."""
    category: dict[str, str] = {}
    kept = []
    for row in rows:
        with bad.guard(row.csv_path):
            for voc_id in (row.src, row.trg):
                if category.setdefault(voc_id, row.category) != row.category:
                    raise DataError(
                        row.csv_path,
                        f"line {row.line}: image {voc_id} has class {row.category} here but {category[voc_id]} earlier",
                    )
            kept.append(row)
    return kept, category


def pair_list(raw_dir: Path, spec: DatasetSpec, split: str) -> Path:
    """The csv that lists the pairs of ``split``."""
    return Path(raw_dir) / SPLIT_FILES[split]


def normalize(raw_dir: Path, spec: DatasetSpec, bad: BadItems) -> tuple[pa.Table, pa.Table]:
    """Normalise the PF-PASCAL pair lists of ``spec.splits`` (test, val, all) into ``(images, pairs)``.

    Pairs come in split order, then csv order; images (those the kept pairs use) sorted by id. A malformed
    csv row, image or ``.mat`` raises a DataError naming the file (and the csv line), or, with
    ``bad.skip_bad``, is recorded and skipped together with the pairs that need it.
    """
    raw_dir = Path(raw_dir)
    from_mapping(Options, spec.options, f"datasets.{spec.name}.options")
    unknown = [split for split in spec.splits if split not in SPLIT_FILES]
    if unknown:
        raise CatalogError(f"datasets.{spec.name}.splits: unknown split(s) {unknown}; valid: {', '.join(SPLIT_FILES)}")
    rows: list[_Row] = []
    paths: dict[str, PurePosixPath] = {}
    for split in dict.fromkeys(spec.splits):
        csv_path = pair_list(raw_dir, spec, split)
        split_rows, split_paths = _read_csv(csv_path, split, bad)
        for voc_id, path in split_paths.items():
            if paths.setdefault(voc_id, path) != path:
                raise DataError(csv_path, f"image id {voc_id} names {path} here but {paths[voc_id]} in another list")
        rows.extend(split_rows)
    rows, category = _categories(rows, bad)

    images: dict[str, _Image] = {}
    for voc_id in sorted(category):
        with bad.guard(raw_dir / paths[voc_id]):
            images[voc_id] = _read_image(raw_dir, paths[voc_id], category[voc_id])

    pair_rows = []
    for row, pair_id in zip(rows, _pair_ids(rows), strict=True):
        with bad.guard(row.csv_path):
            pair_rows.append(_pair_row(row, pair_id, images, raw_dir))
    used = {row[key] for row in pair_rows for key in ("src_image_id", "trg_image_id")}
    image_rows = [images[voc_id].row for voc_id in sorted(used)]
    for row in (*image_rows, *pair_rows):
        row["dataset"] = spec.name
    return images_table(image_rows), pairs_table(pair_rows)
