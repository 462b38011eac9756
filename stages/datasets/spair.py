"""SPair-71k (Min et al. 2019): normalise the official pair and image annotations into the common tables.

Layout under the raw folder: ``SPair-71k/`` with ``JPEGImages/<category>/<imname>.jpg``,
``ImageAnnotation/<category>/<imname>.json``, ``PairAnnotation/<split>/<pair name>.json``,
``Layout/<layout>/<split>.txt`` and ``Segmentation/<category>/<imname>.png``. A split's pairs are the names
listed in its layout file (``000001-2008_002719-2008_004100:aeroplane``; the ':' is part of the file name).
Sizes in the pair JSONs are ``[width, height, depth]`` and are checked against the JPEG headers; boxes are
``[x1, y1, x2, y2]``; the keypoints are those visible in both images, in the same order. PCK uses the target
bounding box. Ids: a pair is its name, an image ``<category>/<imname without .jpg>``.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.catalog import DatasetSpec
from pipeline.config import from_mapping
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems, as_points, check_points_inside, image_size
from stages.datasets.schema import images_table, pairs_table

ROOT = "SPair-71k"
SPLITS = ("trn", "val", "test")
# Largest value of each difficulty flag: variations 0 easy .. 2 hard; truncation, occlusion 0 none .. 3 both.
FLAG_MAX = {"viewpoint_variation": 2, "scale_variation": 2, "truncation": 3, "occlusion": 3}


@dataclass(frozen=True)
class Options:
    """SPair-71k options in the catalog: ``layout`` picks the official pair lists (``Layout/<layout>/``)."""

    layout: Literal["large", "small"] = "large"


@dataclass(frozen=True)
class _Side:
    """One image of a pair as the pair JSON describes it."""

    image_id: str
    imname: str  # without ``.jpg``
    size: tuple[int, int]  # (width, height)
    bbox: list[float]
    kps: list[list[float]]


@dataclass(frozen=True)
class _Pair:
    """A parsed pair JSON: both sides, the shared keypoint ids and the difficulty flags."""

    name: str
    split: str
    path: Path
    category: str
    src: _Side
    trg: _Side
    kps_ids: list[int]
    mirror: bool
    flags: dict[str, int]


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON annotation file as a dict; DataError when missing, unparsable or not an object."""
    if not path.is_file():
        raise DataError(path, "annotation file is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, f"expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise DataError(path, f"field {key!r} is missing")
    return data[key]


def _is_finite_number(value: Any) -> bool:
    """A JSON value that is an int (not a bool) or a finite float."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value)
    )


def _numbers(data: dict[str, Any], key: str, count: int, path: Path) -> list[float]:
    """Field ``key`` as exactly ``count`` finite numbers."""
    value = _get(data, key, path)
    if not isinstance(value, list) or len(value) != count or not all(map(_is_finite_number, value)):
        raise DataError(path, f"{key}: expected a list of {count} numbers, got {reprlib.repr(value)}")
    return [float(v) for v in value]


def _imsize(data: dict[str, Any], key: str, path: Path) -> tuple[int, int]:
    """Field ``key`` = ``[width, height, depth]`` as ``(width, height)``."""
    width, height, depth = _numbers(data, key, 3, path)
    if min(width, height, depth) < 1 or not all(v.is_integer() for v in (width, height, depth)):
        raise DataError(path, f"{key}: expected positive integers [width, height, depth], got {data[key]}")
    return int(width), int(height)


def _bbox(data: dict[str, Any], key: str, path: Path) -> list[float]:
    """Field ``key`` = ``[x1, y1, x2, y2]`` with x1 <= x2 and y1 <= y2."""
    x1, y1, x2, y2 = box = _numbers(data, key, 4, path)
    if x1 > x2 or y1 > y2:
        raise DataError(path, f"{key}: expected [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {data[key]}")
    return box


def _points(data: dict[str, Any], key: str, path: Path) -> list[list[float]]:
    """Field ``key`` = a list of ``[x, y]`` pixel pairs, [K, 2]."""
    value = _get(data, key, path)
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(map(_is_finite_number, p)) for p in value
    ):
        raise DataError(path, f"{key}: expected a list of [x, y] number pairs, got {reprlib.repr(value)}")
    return as_points(value)


def _kps_ids(data: dict[str, Any], path: Path) -> list[int]:
    """``kps_ids``: keypoint slots, written as integers or as digit strings (``"7"``)."""
    value = _get(data, "kps_ids", path)
    if not isinstance(value, list) or not all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v.isdigit())
        for v in value
    ):
        raise DataError(path, f"kps_ids: expected a list of keypoint ids (0, 1, ...), got {reprlib.repr(value)}")
    return [int(v) for v in value]


def _flag(data: dict[str, Any], key: str, largest: int, path: Path) -> int:
    value = _get(data, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= largest:
        raise DataError(path, f"{key}: expected an integer from 0 to {largest}, got {value!r}")
    return value


def _imname(data: dict[str, Any], key: str, path: Path) -> str:
    value = _get(data, key, path)
    if not isinstance(value, str) or not value.endswith(".jpg") or "/" in value or value.startswith("."):
        raise DataError(path, f"{key}: expected an image file name such as '2008_002719.jpg', got {value!r}")
    return value.removesuffix(".jpg")


def _read_pair(raw_dir: Path, split: str, name: str) -> _Pair:
    """Parse and check ``PairAnnotation/<split>/<name>.json``; keypoints must lie inside the declared size."""
    path = raw_dir / ROOT / "PairAnnotation" / split / f"{name}.json"
    data = _read_json(path)
    category = _get(data, "category", path)
    if category != name.rsplit(":", 1)[1]:
        raise DataError(path, f"category: {category!r} differs from the pair name's ':{name.rsplit(':', 1)[1]}'")
    sides = {}
    for role in ("src", "trg"):
        imname = _imname(data, f"{role}_imname", path)
        width, height = _imsize(data, f"{role}_imsize", path)
        kps = _points(data, f"{role}_kps", path)
        check_points_inside(np.array(kps), width, height, path, what=f"{role}_kps keypoint")
        bbox = _bbox(data, f"{role}_bndbox", path)
        sides[role] = _Side(f"{category}/{imname}", imname, (width, height), bbox, kps)
    kps_ids = _kps_ids(data, path)
    if not len(sides["src"].kps) == len(sides["trg"].kps) == len(kps_ids):
        raise DataError(
            path,
            f"src_kps, trg_kps and kps_ids must have the same length, got "
            f"{len(sides['src'].kps)}, {len(sides['trg'].kps)} and {len(kps_ids)}",
        )
    return _Pair(
        name=name,
        split=split,
        path=path,
        category=category,
        src=sides["src"],
        trg=sides["trg"],
        kps_ids=kps_ids,
        mirror=bool(_flag(data, "mirror", 1, path)),
        flags={key: _flag(data, key, largest, path) for key, largest in FLAG_MAX.items()},
    )


def _pair_names(raw_dir: Path, layout: str, split: str) -> list[str]:
    """The pair names of ``Layout/<layout>/<split>.txt`` in file order."""
    path = raw_dir / ROOT / "Layout" / layout / f"{split}.txt"
    if not path.is_file():
        raise DataError(path, f"the pair list of split {split!r} (layout {layout!r}) is missing")
    names = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        name = text.strip()
        if not name:
            continue
        if name.count(":") != 1 or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(path, f"line {line}: {name!r} is not a pair name like '000001-<src>-<trg>:<category>'")
        names.append(name)
    return names


def _read_image(raw_dir: Path, category: str, imname: str, pair_bbox: list[float]) -> dict:
    """One image's images-table row: its real size, its bbox (image JSON, else ``pair_bbox``), its mask."""
    rel = f"{ROOT}/JPEGImages/{category}/{imname}.jpg"
    width, height = image_size(raw_dir / rel)
    bbox = pair_bbox
    annotation = raw_dir / ROOT / "ImageAnnotation" / category / f"{imname}.json"
    if annotation.exists():
        data = _read_json(annotation)
        for key, real in (("image_width", width), ("image_height", height)):
            declared = _get(data, key, annotation)
            if declared != real:
                raise DataError(annotation, f"{key}: {declared!r} differs from the size of {rel} ({width}x{height})")
        bbox = _bbox(data, "bndbox", annotation)
    mask = f"{ROOT}/Segmentation/{category}/{imname}.png"
    return {
        "image_id": f"{category}/{imname}",
        "category": category,
        "path": rel,
        "width": width,
        "height": height,
        "bbox": bbox,
        "mask_path": mask if (raw_dir / mask).is_file() else None,
    }


def _pair_row(pair: _Pair, images: dict[str, dict]) -> dict:
    """The pairs-table row of ``pair``, once both its images are known and match the declared sizes."""
    for role, side in (("src", pair.src), ("trg", pair.trg)):
        image = images.get(side.image_id)
        if image is None:
            raise DataError(pair.path, f"skipped: its {role} image {side.image_id} is malformed (reported on its own)")
        if (image["width"], image["height"]) != side.size:
            raise DataError(
                pair.path,
                f"{role}_imsize says {side.size[0]}x{side.size[1]} but {image['path']} is "
                f"{image['width']}x{image['height']}",
            )
    return {
        "pair_id": pair.name,
        "split": pair.split,
        "category": pair.category,
        "src_image_id": pair.src.image_id,
        "trg_image_id": pair.trg.image_id,
        "src_kps": pair.src.kps,
        "trg_kps": pair.trg.kps,
        "kps_ids": pair.kps_ids,
        "threshold_kind": "trg_bbox",
        "src_bbox": pair.src.bbox,
        "trg_bbox": pair.trg.bbox,
        "flip": pair.mirror,
        **pair.flags,
    }


def pair_list(raw_dir: Path, spec: DatasetSpec, split: str) -> Path:
    """The layout file that lists the pairs of ``split``."""
    layout = from_mapping(Options, spec.options, f"datasets.{spec.name}.options").layout
    return Path(raw_dir) / ROOT / "Layout" / layout / f"{split}.txt"


def normalize(raw_dir: Path, spec: DatasetSpec, bad: BadItems) -> tuple[pa.Table, pa.Table]:
    """Normalise SPair-71k's ``spec.splits`` of layout ``spec.options.layout`` into ``(images, pairs)``.

    Pairs come in split order, then layout-file order; images (those the kept pairs use) sorted by id. A
    malformed pair JSON or image raises a DataError naming the file and the field, or, with
    ``bad.skip_bad``, is recorded and skipped together with the pairs that need it.
    """
    raw_dir = Path(raw_dir)
    options = from_mapping(Options, spec.options, f"datasets.{spec.name}.options")
    unknown = [split for split in spec.splits if split not in SPLITS]
    if unknown:
        raise CatalogError(f"datasets.{spec.name}.splits: unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    pairs: list[_Pair] = []
    listed: dict[str, str] = {}  # pair name -> the split that lists it
    for split in dict.fromkeys(spec.splits):
        for name in _pair_names(raw_dir, options.layout, split):
            if name in listed:
                raise DataError(
                    raw_dir / ROOT / "Layout" / options.layout / f"{split}.txt",
                    f"pair {name} is listed twice (also in split {listed[name]!r})",
                )
            listed[name] = split
            with bad.guard(raw_dir / ROOT / "PairAnnotation" / split / f"{name}.json"):
                pairs.append(_read_pair(raw_dir, split, name))

    first_side: dict[str, _Side] = {}  # image id -> the first pair side naming it (its fallback bbox)
    for pair in pairs:
        for side in (pair.src, pair.trg):
            first_side.setdefault(side.image_id, side)
    images: dict[str, dict] = {}
    for image_id in sorted(first_side):
        side = first_side[image_id]
        category = image_id.split("/", 1)[0]
        with bad.guard(raw_dir / ROOT / "JPEGImages" / category / f"{side.imname}.jpg"):
            images[image_id] = _read_image(raw_dir, category, side.imname, side.bbox)

    pair_rows = []
    for pair in pairs:
        with bad.guard(pair.path):
            pair_rows.append(_pair_row(pair, images))
    used = {row[key] for row in pair_rows for key in ("src_image_id", "trg_image_id")}
    image_rows = [images[image_id] for image_id in sorted(used)]
    for row in (*image_rows, *pair_rows):
        row["dataset"] = spec.name
    return images_table(image_rows), pairs_table(pair_rows)
