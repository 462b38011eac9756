"""TSS (Taniai et al., CVPR 2016): normalise the pair folders of ``TSS_CVPR2016.zip`` into the common tables.

Layout: ``TSS_CVPR2016/{FG3DCar,JODS,PASCAL}/<pair>/`` with ``image1.png image2.png flow1.flo flow2.flo
mask1.png mask2.png flip_gt.txt corr.txt``. Every pair folder gives two images and two scored directions,
``1to2`` (``flow1`` on image1's grid) and ``2to1`` (``flow2`` on image2's grid).

``corr.txt`` holds sparse matches ``x1 y1 x2 y2`` normalised by each image's width and height from MATLAB's
1-based pixel coordinates: the 0-based pixel is ``x * W - 1`` (likewise ``y * H - 1``). On the real
fixture pairs the ground-truth flows carry these points onto their partners with a median error of 0.11 px
under that reading, against 0.22 px for ``x * W - 0.5`` and 0.39 px for ``x * W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.catalog import DatasetSpec
from pipeline.config import from_mapping
from pipeline.errors import DataError
from stages.datasets.common import BadItems, as_points, check_points_inside, image_size
from stages.datasets.flo import read_flip, read_flo
from stages.datasets.schema import images_table, pairs_table

ROOT = "TSS_CVPR2016"
SUBSETS = ("FG3DCar", "JODS", "PASCAL")
DIRECTIONS = (("1to2", 1, 2), ("2to1", 2, 1))  # (direction, source image number, target image number)


@dataclass(frozen=True)
class Options:
    """TSS options in the catalog: which subsets to normalise."""

    subsets: tuple[Literal["FG3DCar", "JODS", "PASCAL"], ...] = SUBSETS


def load_mask(path: str | Path) -> np.ndarray:
    """[H, W] bool foreground of a TSS mask PNG.

    JODS masks are palette images whose indices are {0, 1} (a conversion to RGB or grey would turn index 1
    into its palette colour); FG3DCar and PASCAL masks are grey {0, 255}. Both are foreground where the
    raw stored value is > 0.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mask file is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1"):
                raise DataError(path, f"expected a palette or grey mask, got image mode {im.mode}")
            return np.asarray(im) > 0
    except UnidentifiedImageError as exc:
        raise DataError(path, "not a readable image") from exc


def _read_corr(path: Path) -> np.ndarray:
    """The normalised matches of ``corr.txt`` as a [K, 4] array of ``x1 y1 x2 y2`` in [0, 1]."""
    if not path.is_file():
        raise DataError(path, "correspondence file is missing")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) != 4:
            raise DataError(path, f"line {number}: expected 4 numbers 'x1 y1 x2 y2', got {line.strip()[:60]!r}")
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _corr_to_pixels(corr: np.ndarray, size1: tuple[int, int], size2: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Matches [K, 4] normalised (1-based) -> ``(kps1, kps2)``, each [K, 2] 0-based pixels of image1 / image2.

    ``size1`` and ``size2`` are ``(width, height)``.
    """
    kps1 = corr[:, 0:2] * np.array(size1, dtype=np.float64) - 1.0
    kps2 = corr[:, 2:4] * np.array(size2, dtype=np.float64) - 1.0
    return kps1, kps2


def _relative(path: Path, raw_dir: Path) -> str:
    return path.relative_to(raw_dir).as_posix()


def _read_pair(pair_dir: Path, subset: str, raw_dir: Path) -> tuple[list[dict], list[dict]]:
    """Validate one pair folder; its two image rows and two pair rows (one per direction)."""
    group = f"{subset}/{pair_dir.name}"
    sizes = {}
    image_rows = []
    for number in (1, 2):
        image = pair_dir / f"image{number}.png"
        mask = pair_dir / f"mask{number}.png"
        sizes[number] = image_size(image)
        mask_shape = load_mask(mask).shape
        if mask_shape[::-1] != sizes[number]:
            raise DataError(
                mask,
                f"mask is {mask_shape[1]}x{mask_shape[0]} but image{number}.png is "
                f"{sizes[number][0]}x{sizes[number][1]}",
            )
        image_rows.append(
            {
                "image_id": f"{group}/image{number}",
                "category": subset,
                "path": _relative(image, raw_dir),
                "width": sizes[number][0],
                "height": sizes[number][1],
                "mask_path": _relative(mask, raw_dir),
            }
        )
    flip = read_flip(pair_dir / "flip_gt.txt")
    corr_path = pair_dir / "corr.txt"
    kps = dict(zip((1, 2), _corr_to_pixels(_read_corr(corr_path), sizes[1], sizes[2]), strict=True))
    for number in (1, 2):
        check_points_inside(kps[number], *sizes[number], corr_path, what=f"image{number} match")
    pair_rows = []
    for direction, src, trg in DIRECTIONS:
        flow_path = pair_dir / f"flow{src}.flo"
        flow_shape = read_flo(flow_path).shape
        if flow_shape[1::-1] != sizes[src]:
            raise DataError(
                flow_path,
                f"flow is {flow_shape[1]}x{flow_shape[0]} but its source image{src}.png is "
                f"{sizes[src][0]}x{sizes[src][1]}",
            )
        pair_rows.append(
            {
                "pair_id": f"{group}/{direction}",
                "split": "test",
                "category": subset,
                "src_image_id": f"{group}/image{src}",
                "trg_image_id": f"{group}/image{trg}",
                "src_kps": as_points(kps[src]),
                "trg_kps": as_points(kps[trg]),
                "kps_ids": list(range(len(kps[src]))),
                "threshold_kind": "trg_image",
                "flip": flip,
                "flow_path": _relative(flow_path, raw_dir),
                "direction": direction,
                "group": group,
            }
        )
    return image_rows, pair_rows


def _subset_dirs(raw_dir: Path, subsets: tuple[str, ...]) -> list[Path]:
    """The requested subset folders that exist; DataError naming ``TSS_CVPR2016`` when there are none."""
    root = raw_dir / ROOT
    if not root.is_dir():
        raise DataError(root, f"folder is missing; expected {ROOT}/{{{','.join(SUBSETS)}}}/<pair>/ from {ROOT}.zip")
    found = [root / subset for subset in subsets if (root / subset).is_dir()]
    if not found:
        raise DataError(root, f"holds none of the subset folders {', '.join(subsets)}")
    return found


def normalize(raw_dir: Path, spec: DatasetSpec, bad: BadItems) -> tuple[pa.Table, pa.Table]:
    """Normalise TSS under ``raw_dir`` into ``(images, pairs)``: 2 images and 2 directions per pair folder.

    A malformed pair folder raises a DataError naming the file (or is recorded in ``bad`` and skipped).
    """
    raw_dir = Path(raw_dir)
    options = from_mapping(Options, spec.options, f"datasets.{spec.name}.options")
    image_rows: list[dict] = []
    pair_rows: list[dict] = []
    pair_dirs = [
        pair_dir
        for subset_dir in _subset_dirs(raw_dir, options.subsets)
        for pair_dir in sorted(subset_dir.iterdir())
        if pair_dir.is_dir() and not pair_dir.name.startswith(".")
    ]
    if not pair_dirs:
        raise DataError(raw_dir / ROOT, f"no pair folders in the subsets {', '.join(options.subsets)}")
    for pair_dir in pair_dirs:
        with bad.guard(pair_dir):
            images, pairs = _read_pair(pair_dir, pair_dir.parent.name, raw_dir)
            image_rows += images
            pair_rows += pairs
    for row in (*image_rows, *pair_rows):
        row["dataset"] = spec.name
    image_rows.sort(key=lambda row: row["image_id"])
    pair_rows.sort(key=lambda row: row["pair_id"])
    return images_table(image_rows), pairs_table(pair_rows)
