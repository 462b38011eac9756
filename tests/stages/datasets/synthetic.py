"""Schema-exact synthetic SPair-71k and PF-PASCAL trees for tests, with the table rows they must normalise to.

Each writer lays out a tiny dataset under a raw folder in the official formats (real JPEG/PNG files, JSONs
and ``.mat`` files) and returns the expected ``images`` and ``pairs`` rows, written down by hand here so
that they are an oracle independent of the normalisers.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

NAN = math.nan
NULL_PAIR_COLUMNS = {"flow_path": None, "direction": None, "group": None, "variant": None}
NULL_SPAIR_COLUMNS = {
    "viewpoint_variation": None,
    "scale_variation": None,
    "truncation": None,
    "occlusion": None,
}


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A small random RGB JPEG of ``width`` x ``height`` pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_mask(path: Path, width: int, height: int, bbox: list[float]) -> None:
    """An 8-bit {0, 255} foreground mask filling ``bbox``."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in bbox)
    mask[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path, format="PNG")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- SPair-71k

SPAIR_ROOT = "SPair-71k"
# image id -> (width, height, bbox [x1, y1, x2, y2], has an ImageAnnotation JSON, has a Segmentation PNG)
SPAIR_IMAGES = {
    "aeroplane/2008_000001": (40, 30, [2, 3, 35, 27], True, True),
    "aeroplane/2008_000002": (36, 32, [1, 2, 30, 30], False, False),
    "cat/2009_000010": (30, 40, [4, 5, 26, 38], True, True),
    "cat/2009_000011": (32, 28, [0, 0, 31, 27], True, False),
}
# pair name -> (split, src kps, trg kps, kps_ids, mirror, viewpoint, scale, truncation, occlusion)
SPAIR_PAIRS = {
    "000001-2008_000001-2008_000002:aeroplane": (
        "test", [[3, 4], [20, 15], [34, 26]], [[2, 3], [18, 20], [29, 29]], [0, 7, 11], 0, 1, 0, 2, 1,
    ),
    "000003-2009_000010-2009_000011:cat": (
        "test", [[5, 6], [25, 37]], [[1, 1], [30, 26]], [3, 4], 0, 2, 2, 0, 3,
    ),
    "000002-2008_000002-2008_000001:aeroplane": ("trn", [[10, 10]], [[30, 20]], [5], 1, 0, 1, 1, 0),
    "000004-2009_000011-2009_000010:cat": (
        "val", [[31, 27], [0, 0]], [[26, 38], [4, 5]], [2, 9], 0, 0, 0, 3, 2,
    ),
}  # fmt: skip
SPAIR_LAYOUTS = {
    "large": {
        "trn": ["000002-2008_000002-2008_000001:aeroplane"],
        "val": ["000004-2009_000011-2009_000010:cat"],
        "test": ["000001-2008_000001-2008_000002:aeroplane", "000003-2009_000010-2009_000011:cat"],
    },
    "small": {
        "trn": ["000002-2008_000002-2008_000001:aeroplane"],
        "val": ["000004-2009_000011-2009_000010:cat"],
        "test": ["000003-2009_000010-2009_000011:cat"],
    },
}


@dataclass(frozen=True)
class Expected:
    """The rows a synthetic dataset must normalise to: images by id, pairs by id with their splits."""

    images: dict[str, dict]
    pairs: dict[str, dict]

    def pair_rows(self, pair_ids: list[str]) -> list[dict]:
        """The expected pairs rows of ``pair_ids``, in that order."""
        return [self.pairs[pair_id] for pair_id in pair_ids]

    def image_rows(self, pair_ids: list[str]) -> list[dict]:
        """The expected images rows of the images ``pair_ids`` use, sorted by image id."""
        used = {self.pairs[p][key] for p in pair_ids for key in ("src_image_id", "trg_image_id")}
        return [self.images[image_id] for image_id in sorted(used)]


def spair_pair_ids(layout: str, splits: list[str]) -> list[str]:
    """The pair names the synthetic SPair-71k lists for ``splits`` of ``layout``, in normalised order."""
    return [name for split in splits for name in SPAIR_LAYOUTS[layout][split]]


def spair_pair_json(root: Path, name: str) -> Path:
    """Where the synthetic SPair-71k keeps pair ``name``'s annotation."""
    return root / SPAIR_ROOT / "PairAnnotation" / SPAIR_PAIRS[name][0] / f"{name}.json"


def write_spair(root: Path, dataset: str = "spair") -> Expected:
    """Write a 4-image, 4-pair SPair-71k tree (both layouts, all splits) under ``root``; return its rows.

    ``aeroplane/2008_000002`` has no image JSON (its bbox then comes from the pair JSONs) and two images
    have no segmentation PNG. ``kps_ids`` are written as digit strings, as in the release.
    """
    base = root / SPAIR_ROOT
    images = {}
    image_kps: dict[str, dict[str, list]] = {image_id: {} for image_id in SPAIR_IMAGES}
    for index, (image_id, (width, height, bbox, _, has_mask)) in enumerate(SPAIR_IMAGES.items()):
        category, imname = image_id.split("/")
        write_jpeg(base / "JPEGImages" / category / f"{imname}.jpg", width, height, seed=index)
        mask = f"{SPAIR_ROOT}/Segmentation/{category}/{imname}.png"
        if has_mask:
            write_mask(root / mask, width, height, bbox)
        images[image_id] = {
            "image_id": image_id,
            "dataset": dataset,
            "category": category,
            "path": f"{SPAIR_ROOT}/JPEGImages/{category}/{imname}.jpg",
            "width": width,
            "height": height,
            "bbox": [float(v) for v in bbox],
            "mask_path": mask if has_mask else None,
        }

    pairs = {}
    for name, (split, src_kps, trg_kps, kps_ids, mirror, view, scale, trunc, occl) in SPAIR_PAIRS.items():
        number, src_name, rest = name.split("-")
        trg_name, category = rest.split(":")
        src_id, trg_id = f"{category}/{src_name}", f"{category}/{trg_name}"
        for image_id, kps in ((src_id, src_kps), (trg_id, trg_kps)):
            image_kps[image_id].update({str(k): xy for k, xy in zip(kps_ids, kps, strict=True)})
        src_w, src_h, src_box, *_ = SPAIR_IMAGES[src_id]
        trg_w, trg_h, trg_box, *_ = SPAIR_IMAGES[trg_id]
        annotation = {
            "pair_id": int(number),
            "filename": name,
            "src_imname": f"{src_name}.jpg",
            "trg_imname": f"{trg_name}.jpg",
            "src_imsize": [src_w, src_h, 3],
            "trg_imsize": [trg_w, trg_h, 3],
            "src_bndbox": src_box,
            "trg_bndbox": trg_box,
            "src_pose": 2,
            "trg_pose": 4,
            "category": category,
            "src_kps": src_kps,
            "trg_kps": trg_kps,
            "kps_ids": [str(k) for k in kps_ids],
            "mirror": mirror,
            "viewpoint_variation": view,
            "scale_variation": scale,
            "truncation": trunc,
            "occlusion": occl,
        }
        _write_json(base / "PairAnnotation" / split / f"{name}.json", annotation)
        pairs[name] = {
            "pair_id": name,
            "dataset": dataset,
            "split": split,
            "category": category,
            "src_image_id": src_id,
            "trg_image_id": trg_id,
            "src_kps": [[float(x), float(y)] for x, y in src_kps],
            "trg_kps": [[float(x), float(y)] for x, y in trg_kps],
            "kps_ids": kps_ids,
            "threshold_kind": "trg_bbox",
            "src_bbox": [float(v) for v in src_box],
            "trg_bbox": [float(v) for v in trg_box],
            "flip": bool(mirror),
            "viewpoint_variation": view,
            "scale_variation": scale,
            "truncation": trunc,
            "occlusion": occl,
            **NULL_PAIR_COLUMNS,
        }

    for image_id, (width, height, bbox, has_json, _) in SPAIR_IMAGES.items():
        category, imname = image_id.split("/")
        if has_json:
            image_annotation = {
                "filename": f"{imname}.jpg",
                "src_database": "PASCAL VOC 2012",
                "image_width": width,
                "image_height": height,
                "image_depth": 3,
                "category": category,
                "pose": "frontal",
                "truncated": 0,
                "occluded": 0,
                "difficult": 0,
                "bndbox": bbox,
                "azimuth_id": 3,
                "kps": {str(k): image_kps[image_id].get(str(k)) for k in range(30)},
            }
            _write_json(base / "ImageAnnotation" / category / f"{imname}.json", image_annotation)

    for layout, splits in SPAIR_LAYOUTS.items():
        for split, names in splits.items():
            path = base / "Layout" / layout / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{name}\n" for name in names))
    (base / "devkit").mkdir()
    return Expected(images, pairs)


# ---------------------------------------------------------------- PF-PASCAL

PFPASCAL_ROOT = "PF-dataset-PASCAL"
# voc id -> (width, height, class, .mat kps [N, 2] with NaN rows (None: no .mat), bbox)
PFPASCAL_IMAGES = {
    "2009_003129": (40, 30, "aeroplane", [[5, 6], [10, 12], [NAN, NAN], [20, 8], [30, 20]], [3, 2, 36, 28]),
    "2010_000001": (
        36,
        32,
        "aeroplane",
        [[4, 5], [NAN, NAN], [15, 16], [22, 10], [33.5, 25]],
        [1, 1, 35, 31],
    ),
    "2008_000100": (30, 40, "dog", [[2, 3], [12, 30], [NAN, NAN]], [0, 1, 29, 39]),
    "2008_000200": (32, 28, "dog", None, None),
}
# csv rows per split: (source id, target id, class index), keypoints taken from PFPASCAL_CSV_KPS
PFPASCAL_ROWS = {
    "test": [
        ("2009_003129", "2010_000001", 1),
        ("2008_000100", "2008_000200", 12),
        ("2009_003129", "2010_000001", 1),  # the same ordered pair again, as the release can have
        ("2010_000001", "2009_003129", 1),
    ],
    "val": [("2008_000200", "2008_000100", 12)],
}
PFPASCAL_ROWS["all"] = PFPASCAL_ROWS["test"] + PFPASCAL_ROWS["val"]
# The csv lists every keypoint slot of the image, NaN where absent; 2008_000200 has no .mat to agree with.
PFPASCAL_CSV_KPS = {
    voc_id: (kps if kps is not None else [[NAN, NAN], [7, 8], [25.25, 20]])
    for voc_id, (_, _, _, kps, _) in PFPASCAL_IMAGES.items()
}
# pair id -> (split, src id, trg id, kps_ids finite in both), written out by hand
PFPASCAL_PAIRS = {
    "test/2009_003129-2010_000001/0000": ("test", "2009_003129", "2010_000001", [0, 3, 4]),
    "test/2008_000100-2008_000200": ("test", "2008_000100", "2008_000200", [1]),
    "test/2009_003129-2010_000001/0002": ("test", "2009_003129", "2010_000001", [0, 3, 4]),
    "test/2010_000001-2009_003129": ("test", "2010_000001", "2009_003129", [0, 3, 4]),
    "val/2008_000200-2008_000100": ("val", "2008_000200", "2008_000100", [1]),
    "all/2009_003129-2010_000001/0000": ("all", "2009_003129", "2010_000001", [0, 3, 4]),
    "all/2008_000100-2008_000200": ("all", "2008_000100", "2008_000200", [1]),
    "all/2009_003129-2010_000001/0002": ("all", "2009_003129", "2010_000001", [0, 3, 4]),
    "all/2010_000001-2009_003129": ("all", "2010_000001", "2009_003129", [0, 3, 4]),
    "all/2008_000200-2008_000100": ("all", "2008_000200", "2008_000100", [1]),
}
PFPASCAL_HEADER = ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"]


def pfpascal_pair_ids(splits: list[str]) -> list[str]:
    """The pair ids of the synthetic PF-PASCAL's ``splits``, in normalised order (split, then csv row)."""
    return [pair_id for split in splits for pair_id, spec in PFPASCAL_PAIRS.items() if spec[0] == split]


def pfpascal_image_path(voc_id: str) -> str:
    """An image's path relative to the raw folder, as the csv writes it."""
    return f"{PFPASCAL_ROOT}/JPEGImages/{voc_id}.jpg"


def pfpascal_mat(root: Path, voc_id: str) -> Path:
    """Where the synthetic PF-PASCAL keeps image ``voc_id``'s ``.mat``."""
    return root / PFPASCAL_ROOT / "Annotations" / PFPASCAL_IMAGES[voc_id][2] / f"{voc_id}.mat"


def _coordinate_list(values: list[float]) -> str:
    return ";".join("nan" if math.isnan(v) else f"{v:g}" for v in values)


def pfpascal_csv_row(src: str, trg: str, class_index: int) -> list[str]:
    """A csv row pairing ``src`` and ``trg`` with their synthetic keypoints, as the release writes it."""
    src_kps, trg_kps = (np.array(PFPASCAL_CSV_KPS[voc_id], dtype=np.float64) for voc_id in (src, trg))
    return [
        pfpascal_image_path(src),
        pfpascal_image_path(trg),
        str(class_index),
        *(_coordinate_list(column.tolist()) for column in (*src_kps.T, *trg_kps.T)),
    ]


def write_pfpascal_csv(path: Path, rows: list[list[str]]) -> None:
    """A pair list: the CNNGeometric header, then ``rows``."""
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([PFPASCAL_HEADER, *rows])


def write_pfpascal(root: Path, dataset: str = "pf-pascal") -> Expected:
    """Write a 4-image PF-PASCAL tree, test/val/all pair lists and macOS junk under ``root``; return its rows.

    ``2008_000200`` has no ``.mat`` (null bbox); the test list repeats one ordered pair.
    """
    base = root / PFPASCAL_ROOT
    images = {}
    for index, (voc_id, (width, height, category, kps, bbox)) in enumerate(PFPASCAL_IMAGES.items()):
        write_jpeg(root / pfpascal_image_path(voc_id), width, height, seed=10 + index)
        if kps is not None:
            mat = pfpascal_mat(root, voc_id)
            mat.parent.mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(mat, {"kps": np.array(kps, dtype=np.float64), "bbox": np.array([bbox], dtype=np.float64)})
        images[voc_id] = {
            "image_id": voc_id,
            "dataset": dataset,
            "category": category,
            "path": pfpascal_image_path(voc_id),
            "width": width,
            "height": height,
            "bbox": None if bbox is None else [float(v) for v in bbox],
            "mask_path": None,
        }
    for split, rows in PFPASCAL_ROWS.items():
        write_pfpascal_csv(root / f"{split}_pairs_pf_pascal.csv", [pfpascal_csv_row(*row) for row in rows])

    junk = [
        root / "__MACOSX" / PFPASCAL_ROOT / "JPEGImages" / "._2009_003129.jpg",
        root / "__MACOSX" / PFPASCAL_ROOT / "Annotations" / "aeroplane" / "._2009_003129.mat",
        base / ".DS_Store",
        base / "Annotations" / ".DS_Store",
    ]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")

    pairs = {}
    for pair_id, (split, src, trg, kps_ids) in PFPASCAL_PAIRS.items():
        src_kps, trg_kps = (np.array(PFPASCAL_CSV_KPS[voc_id], dtype=np.float64)[kps_ids] for voc_id in (src, trg))
        pairs[pair_id] = {
            "pair_id": pair_id,
            "dataset": dataset,
            "split": split,
            "category": PFPASCAL_IMAGES[src][2],
            "src_image_id": src,
            "trg_image_id": trg,
            "src_kps": src_kps.tolist(),
            "trg_kps": trg_kps.tolist(),
            "kps_ids": kps_ids,
            "threshold_kind": "trg_image",
            "src_bbox": images[src]["bbox"],
            "trg_bbox": images[trg]["bbox"],
            "flip": False,
            **NULL_SPAIR_COLUMNS,
            **NULL_PAIR_COLUMNS,
        }
    return Expected(images, pairs)
