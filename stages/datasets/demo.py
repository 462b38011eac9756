"""The offline ``demo`` benchmark: scikit-image's photographs paired with copies under known smooth warps.

Nothing is downloaded: :func:`materialize` writes the raw folder from the photographs scikit-image ships,
and :func:`normalize` turns it into the common tables like every real dataset.

Warp and flow convention (exact by construction):

- Each pair has a forward map ``W`` from source to target pixels, defined analytically by :class:`Warp`:
  ``W(p) = c + t + L (p + d(p) - c)`` with ``c`` the image centre, ``t`` a translation,
  ``L = R(rotation) diag(scale) F`` (``F`` a horizontal flip about the centre for mirrored pairs, else
  identity; ``diag(scale)`` about 0.5 for the ``smaller`` pairs' targets, about 2 for the ``larger`` ones')
  and ``d`` a low-frequency displacement ``d(p) = sum_m a_m sin(w_m . p + phi_m)`` whose Lipschitz
  bound ``sum_m |a_m| |w_m|`` is kept below :data:`LIPSCHITZ_BOUND` < 1, so ``W`` is a diffeomorphism.
- The ground truth is the analytic forward map: ``flow/<pair>.flo`` lives on the source grid with
  ``p_trg = p_src + flow[p_src]`` (TSS convention), 1e10 where ``W(p)`` leaves the target's pixel-centre
  rectangle ``[0, w-1] x [0, h-1]``; target keypoints are ``W(src keypoints)``.
- The target image is rendered by inverse mapping: each target pixel ``q`` samples the source (cubic
  spline) at ``W^-1(q)``, found by the contraction ``p <- L^-1 (q - c - t) + c - d(p)`` to 1e-6 px. Target
  pixels whose preimage leaves the source are :data:`BACKGROUND` grey; the source mask marks the valid flow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage.feature import corner_harris, corner_peaks
from skimage.transform import resize

from pipeline.catalog import DatasetSpec
from pipeline.config import from_mapping
from pipeline.errors import CatalogError, DataError
from stages.datasets.common import BadItems, as_points, check_points_inside, image_size
from stages.datasets.flo import UNKNOWN_FLOW, flow_validity, read_flo, write_flo
from stages.datasets.schema import images_table, pairs_table

# Natural colour photographs that scikit-image ships inside its wheel (no pooch download needed).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skdata.astronaut,
    "chelsea": skdata.chelsea,
    "coffee": skdata.coffee,
    "rocket": skdata.rocket,
    "motorcycle": lambda: skdata.stereo_motorcycle()[0],
}

MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.8, 1.05)  # per axis, so the scaling is anisotropic
MAX_TRANSLATION = 0.05  # fraction of the image's width / height
N_MODES = 4  # sine modes of the non-rigid displacement
CYCLES_RANGE = (0.5, 1.5)  # spatial frequency of a mode, in cycles per long image side
MAX_MODE_AMPLITUDE = 0.015  # fraction of the long side, per mode
LIPSCHITZ_BOUND = 0.5  # on the displacement: keeps W invertible and the inverse iteration contracting
BACKGROUND = 128  # grey filling target pixels whose preimage leaves the source
KEYPOINT_MARGIN = 2  # px of valid flow around every keypoint, so bilinear reads of the flow see only valid vectors
MAX_WARP_DRAWS = 10
ANNOTATIONS = "annotations.json"


@dataclass(frozen=True)
class Options:
    """The demo's settings (``datasets.<name>.options`` in the catalog)."""

    n_pairs: int = 12
    seed: int = 0
    max_side: int = 320  # photos are downscaled so their long side is at most this
    mirrored_fraction: float = 0.25  # spread evenly: 0.25 mirrors pairs 3, 7, 11, ...
    smaller_fraction: float = 0.25  # target object at ~0.5x: pairs 1, 5, 9, ... at 0.25
    larger_fraction: float = 0.25  # target object at ~2x: pairs 2, 6, 10, ... at 0.25
    n_keypoints: int = 20


def parse_options(spec: DatasetSpec) -> Options:
    """Validate ``spec.options`` into :class:`Options`; CatalogError names the bad key and the valid ones."""
    where = f"datasets.{spec.name}.options"
    options = from_mapping(Options, spec.options, where)
    limits = {
        "n_pairs": (options.n_pairs >= 1, ">= 1"),
        "max_side": (options.max_side >= 32, ">= 32"),
        "mirrored_fraction": (0.0 <= options.mirrored_fraction <= 1.0, "in [0, 1]"),
        "smaller_fraction": (0.0 <= options.smaller_fraction <= 1.0, "in [0, 1]"),
        "larger_fraction": (0.0 <= options.larger_fraction <= 1.0, "in [0, 1]"),
        "n_keypoints": (options.n_keypoints >= 1, ">= 1"),
    }
    for key, (ok, expected) in limits.items():
        if not ok:
            raise CatalogError(f"{where}.{key}: must be {expected}, got {getattr(options, key)!r}")
    return options


@dataclass(frozen=True)
class Warp:
    """A smooth invertible map ``W`` from source to target pixel coordinates (see the module docstring)."""

    centre: tuple[float, float]
    rotation_deg: float
    scale: tuple[float, float]
    translation: tuple[float, float]
    mirrored: bool
    amplitudes: tuple[tuple[float, float], ...]  # [M, 2] pixels
    frequencies: tuple[tuple[float, float], ...]  # [M, 2] radians per pixel
    phases: tuple[float, ...]  # [M] radians

    def linear(self) -> np.ndarray:
        """[2, 2] ``L = R diag(scale) F``."""
        angle = np.deg2rad(self.rotation_deg)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        flip = np.diag([-1.0 if self.mirrored else 1.0, 1.0])
        return rotation @ np.diag(self.scale) @ flip

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``d(p)`` for points [N, 2] (x, y) -> [N, 2]."""
        phase = points @ np.asarray(self.frequencies).T + np.asarray(self.phases)
        return np.sin(phase) @ np.asarray(self.amplitudes)

    def forward(self, points: np.ndarray) -> np.ndarray:
        """Source points [N, 2] -> their target positions ``W(p)`` [N, 2]."""
        points = np.asarray(points, dtype=np.float64)
        centre = np.asarray(self.centre)
        return centre + np.asarray(self.translation) + (points + self.displacement(points) - centre) @ self.linear().T

    def inverse(self, points: np.ndarray, *, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        """Target points [N, 2] -> source points ``W^-1(q)`` [N, 2], to ``tol`` pixels.

        Solves ``p + d(p) = r`` with ``r = L^-1 (q - c - t) + c`` by the fixed-point iteration
        ``p <- r - d(p)``, a contraction because ``Lip(d) <= LIPSCHITZ_BOUND < 1``.
        """
        centre = np.asarray(self.centre)
        offset = np.asarray(points, dtype=np.float64) - centre - np.asarray(self.translation)
        target = offset @ np.linalg.inv(self.linear()).T + centre
        estimate = target.copy()
        for _ in range(max_iter):
            update = target - self.displacement(estimate)
            step = np.abs(update - estimate).max(initial=0.0)
            estimate = update
            if step < tol:
                return estimate
        raise RuntimeError(f"warp inversion did not reach {tol} px in {max_iter} iterations (last step {step:.2e})")


def random_warp(rng: np.random.Generator, width: int, height: int, *, mirrored: bool, zoom: float = 1.0) -> Warp:
    """Draw a warp for a ``width`` x ``height`` image: rotation, anisotropic scale (times ``zoom``), shift,
    sine modes."""
    side = max(width, height)
    mode_angles = rng.uniform(0.0, 2 * np.pi, N_MODES)
    cycles = rng.uniform(*CYCLES_RANGE, N_MODES)
    frequencies = (2 * np.pi * cycles / side)[:, None] * np.stack([np.cos(mode_angles), np.sin(mode_angles)], 1)
    amplitude_angles = rng.uniform(0.0, 2 * np.pi, N_MODES)
    magnitudes = rng.uniform(0.0, MAX_MODE_AMPLITUDE * side, N_MODES)
    lipschitz = float(np.sum(magnitudes * np.linalg.norm(frequencies, axis=1)))
    magnitudes *= LIPSCHITZ_BOUND / max(lipschitz, LIPSCHITZ_BOUND)
    amplitudes = magnitudes[:, None] * np.stack([np.cos(amplitude_angles), np.sin(amplitude_angles)], 1)
    return Warp(
        centre=((width - 1) / 2, (height - 1) / 2),
        rotation_deg=float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
        scale=tuple(float(s) * zoom for s in rng.uniform(*SCALE_RANGE, 2)),
        translation=tuple(float(v) for v in rng.uniform(-MAX_TRANSLATION, MAX_TRANSLATION, 2) * (width, height)),
        mirrored=mirrored,
        amplitudes=tuple(tuple(float(v) for v in row) for row in amplitudes),
        frequencies=tuple(tuple(float(v) for v in row) for row in frequencies),
        phases=tuple(float(v) for v in rng.uniform(0.0, 2 * np.pi, N_MODES)),
    )


def pixel_grid(width: int, height: int) -> np.ndarray:
    """[H * W, 2] (x, y) centres of every pixel, row-major."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)


def _inside(points: np.ndarray, width: int, height: int) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)


def source_flow(warp: Warp, width: int, height: int) -> np.ndarray:
    """[H, W, 2] flow on the source grid, ``W(p) - p``, 1e10 where ``W(p)`` leaves the (same-size) target."""
    grid = pixel_grid(width, height)
    mapped = warp.forward(grid)
    flow = np.where(_inside(mapped, width, height)[:, None], mapped - grid, UNKNOWN_FLOW)
    return flow.reshape(height, width, 2).astype(np.float32)


def antialiasing_sigma(warp: Warp) -> float:
    """The Gaussian blur (source pixels) that a warp shrinking the source needs before sampling:
    ``(1 / s - 1) / 2`` for its smallest scale ``s`` (as scikit-image's ``rescale``), 0 when it enlarges."""
    return max(0.0, (1 / min(warp.scale) - 1) / 2)


def render_target(src: np.ndarray, warp: Warp) -> np.ndarray:
    """The target image [H, W, 3] uint8: the source, blurred by :func:`antialiasing_sigma`, sampled (cubic
    spline) at ``W^-1(q)`` of each pixel."""
    height, width = src.shape[:2]
    preimages = warp.inverse(pixel_grid(width, height))
    coords = preimages[:, ::-1].T  # (row, col) order for map_coordinates
    sigma = antialiasing_sigma(warp)
    channels = [
        ndimage.map_coordinates(
            ndimage.gaussian_filter(src[..., c].astype(np.float64), sigma, mode="nearest"),
            coords,
            order=3,
            mode="nearest",
        )
        for c in range(3)
    ]
    colours = np.clip(np.rint(np.stack(channels, 1)), 0, 255)
    colours[~_inside(preimages, width, height)] = BACKGROUND
    return colours.reshape(height, width, 3).astype(np.uint8)


def textured_keypoints(
    src: np.ndarray, valid: np.ndarray, rng: np.random.Generator, count: int, *, zoom: float = 1.0
) -> np.ndarray | None:
    """``count`` [K, 2] Harris corners of ``src`` amid valid flow, jittered sub-pixel; None if too few.

    Corners are at least 1/40 of the long side apart, divided by ``zoom`` > 1 (a zoomed-in target shows a
    smaller part of the source, with its corners as far apart in the target as usual)."""
    gray = src.astype(np.float64).mean(axis=2) / 255.0
    safe = ndimage.binary_erosion(valid, iterations=KEYPOINT_MARGIN, border_value=0)
    min_distance = max(2, int(max(src.shape[:2]) / 40 / max(zoom, 1.0)))
    corners = corner_peaks(corner_harris(gray), min_distance=min_distance, threshold_rel=0.01, labels=safe)
    if len(corners) < count:
        return None
    chosen = corners[np.sort(rng.choice(len(corners), count, replace=False))][:, ::-1].astype(np.float64)
    return chosen + rng.uniform(-0.5, 0.5, chosen.shape)


def load_photo(name: str, max_side: int) -> np.ndarray:
    """The photo ``name`` of :data:`PHOTOS`, downscaled (antialiased) so that its long side is at most ``max_side``."""
    photo = PHOTOS[name]()
    height, width = photo.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor == 1.0:
        return photo
    shape = (max(1, round(height * factor)), max(1, round(width * factor)))
    resized = resize(photo, shape, anti_aliasing=True, preserve_range=True, order=1)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


VARIANTS = {"normal": (False, 1.0), "mirrored": (True, 1.0), "smaller": (False, 0.5), "larger": (False, 2.0)}
"""A pair's variant: whether its target is mirrored, and the zoom of its target object."""


def _is_spread(index: int, fraction: float) -> bool:
    # Spreads a fraction of the pairs evenly and keeps pair i's variant independent of n_pairs.
    return int((index + 1) * fraction) > int(index * fraction)


def pair_variant(index: int, options: Options) -> str:
    """Pair ``index``'s variant (a key of :data:`VARIANTS`): mirrored, smaller, larger (each spread evenly
    at its fraction, offset so that at 0.25 they take pairs 3, 1 and 2 of every 4; the first listed wins
    where fractions overlap), else normal."""
    for variant, fraction, offset in (
        ("mirrored", options.mirrored_fraction, 0),
        ("smaller", options.smaller_fraction, 2),
        ("larger", options.larger_fraction, 1),
    ):
        if _is_spread(index + offset, fraction):
            return variant
    return "normal"


def draw_pair(
    src: np.ndarray, rng: np.random.Generator, *, mirrored: bool, zoom: float, n_keypoints: int
) -> tuple[Warp, np.ndarray, np.ndarray] | None:
    """A warp of ``src`` with its source flow and ``n_keypoints`` textured keypoints amid valid flow, drawn
    from ``rng``; None when no draw of :data:`MAX_WARP_DRAWS` leaves enough keypoints."""
    height, width = src.shape[:2]
    for _ in range(MAX_WARP_DRAWS):
        warp = random_warp(rng, width, height, mirrored=mirrored, zoom=zoom)
        flow = source_flow(warp, width, height)
        src_kps = textured_keypoints(src, flow_validity(flow), rng, n_keypoints, zoom=zoom)
        if src_kps is not None:
            return warp, flow, src_kps
    return None


def pair_files(pair_id: str) -> dict[str, str]:
    """The raw files of a pair, relative to the raw folder."""
    return {
        "src": f"images/{pair_id}_src.png",
        "trg": f"images/{pair_id}_trg.png",
        "mask": f"masks/{pair_id}_src.png",
        "flow": f"flow/{pair_id}.flo",
    }


@dataclass(frozen=True)
class DrawnPair:
    """A demo pair as drawn, before it is written: the source photo, its warp, source flow and keypoints."""

    pair_id: str
    category: str
    variant: str
    src: np.ndarray  # [H, W, 3] uint8
    warp: Warp
    flow: np.ndarray  # [H, W, 2] on the source grid (:func:`source_flow`)
    src_kps: np.ndarray  # [K, 2]


def draw_pairs(options: Options, dataset: str) -> Iterator[DrawnPair]:
    """The pairs of the demo ``dataset`` with ``options``, in order: pair ``i`` uses photo ``i mod 5`` and
    draws its warp and keypoints from ``np.random.default_rng([seed, i])``, so the same options give the same
    pairs. CatalogError when a pair cannot get ``n_keypoints`` keypoints."""
    names = list(PHOTOS)
    photos = {name: load_photo(name, options.max_side) for name in names[: options.n_pairs]}
    for index in range(options.n_pairs):
        category = names[index % len(names)]
        variant = pair_variant(index, options)
        mirrored, zoom = VARIANTS[variant]
        drawn = draw_pair(
            photos[category], np.random.default_rng([options.seed, index]), mirrored=mirrored, zoom=zoom,
            n_keypoints=options.n_keypoints,
        )  # fmt: skip
        if drawn is None:
            raise CatalogError(
                f"datasets.{dataset}.options.n_keypoints: {category} ({variant}) has fewer than "
                f"{options.n_keypoints} textured points with valid flow after {MAX_WARP_DRAWS} warps; "
                "lower n_keypoints or raise max_side"
            )
        yield DrawnPair(f"{index:03d}-{category}", category, variant, photos[category], *drawn)


def materialize(raw_dir: Path, spec: DatasetSpec) -> None:
    """Write the demo's raw files into ``raw_dir`` (created by the caller): images, flows, masks, annotations.

    Deterministic (:func:`draw_pairs`): the same options give byte-identical files.
    """
    options = parse_options(spec)
    raw_dir = Path(raw_dir)
    for folder in ("images", "masks", "flow"):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for pair in draw_pairs(options, spec.name):
        files = pair_files(pair.pair_id)
        Image.fromarray(pair.src).save(raw_dir / files["src"])
        Image.fromarray(render_target(pair.src, pair.warp)).save(raw_dir / files["trg"])
        Image.fromarray(np.where(flow_validity(pair.flow), 255, 0).astype(np.uint8)).save(raw_dir / files["mask"])
        write_flo(raw_dir / files["flow"], pair.flow)
        records.append(
            {
                "pair_id": pair.pair_id,
                "category": pair.category,
                "mirrored": pair.warp.mirrored,
                "variant": pair.variant,
                "warp": asdict(pair.warp),
                "src_kps": as_points(pair.src_kps),
                "trg_kps": as_points(pair.warp.forward(pair.src_kps)),
            }
        )
    document = {"dataset": spec.name, "options": asdict(options), "pairs": records}
    (raw_dir / ANNOTATIONS).write_text(json.dumps(document, indent=1) + "\n")


def _checked_size(raw_dir: Path, relative: str, expected: tuple[int, int] | None = None) -> tuple[int, int]:
    size = image_size(raw_dir / relative)
    if expected is not None and size != expected:
        raise DataError(raw_dir / relative, f"is {size[0]}x{size[1]}, expected {expected[0]}x{expected[1]}")
    return size


def _checked_variant(record: dict[str, Any], annotations: Path) -> str:
    """The pair's variant; DataError for one that is missing (a demo written before variants) or unknown."""
    variant = record.get("variant")
    if variant not in VARIANTS:
        raise DataError(
            annotations,
            f"{record['pair_id']}: variant {variant!r} is not one of {', '.join(VARIANTS)}; "
            "regenerate the demo with `pipeline run --stage download --dataset demo --force`",
        )
    return variant


def normalize(raw_dir: Path, spec: DatasetSpec, bad: BadItems) -> tuple[pa.Table, pa.Table]:
    """Read the demo's raw folder into the (images, pairs) tables; every file a pair names is checked."""
    raw_dir = Path(raw_dir)
    annotations = raw_dir / ANNOTATIONS
    try:
        records = json.loads(annotations.read_text())["pairs"]
    except FileNotFoundError:
        raise DataError(annotations, "annotations file is missing; run the download stage") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(annotations, f"not a demo annotations file ({type(exc).__name__}: {exc})") from None
    image_rows, pair_rows = [], []
    for record in records:
        with bad.guard(annotations):
            pair_id = record["pair_id"]
            files = pair_files(pair_id)
            src_size = _checked_size(raw_dir, files["src"])
            trg_size = _checked_size(raw_dir, files["trg"])
            _checked_size(raw_dir, files["mask"], src_size)
            flow_shape = read_flo(raw_dir / files["flow"]).shape[1::-1]
            if flow_shape != src_size:
                raise DataError(
                    raw_dir / files["flow"], f"flow is {flow_shape[0]}x{flow_shape[1]}, expected {src_size}"
                )
            src_kps = np.asarray(record["src_kps"], dtype=np.float64).reshape(-1, 2)
            trg_kps = np.asarray(record["trg_kps"], dtype=np.float64).reshape(-1, 2)
            if len(src_kps) != len(trg_kps):
                raise DataError(annotations, f"{pair_id}: {len(src_kps)} source but {len(trg_kps)} target keypoints")
            check_points_inside(src_kps, *src_size, raw_dir / files["src"])
            check_points_inside(trg_kps, *trg_size, raw_dir / files["trg"])
            category = str(record["category"])
            for side, size in (("src", src_size), ("trg", trg_size)):
                image_rows.append(
                    {
                        "image_id": f"{pair_id}/{side}",
                        "dataset": spec.name,
                        "category": category,
                        "path": files[side],
                        "width": size[0],
                        "height": size[1],
                        "mask_path": files["mask"] if side == "src" else None,
                    }
                )
            pair_rows.append(
                {
                    "pair_id": pair_id,
                    "dataset": spec.name,
                    "split": "test",
                    "category": category,
                    "src_image_id": f"{pair_id}/src",
                    "trg_image_id": f"{pair_id}/trg",
                    "src_kps": as_points(src_kps),
                    "trg_kps": as_points(trg_kps),
                    "kps_ids": list(range(len(src_kps))),
                    "threshold_kind": "trg_image",
                    "flip": bool(record["mirrored"]),
                    "variant": _checked_variant(record, annotations),
                    "flow_path": files["flow"],
                }
            )
    return images_table(image_rows), pairs_table(pair_rows)
