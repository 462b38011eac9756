"""Match your own image pair: features, every chosen matcher, the transferred points, one picture per matcher.

:func:`match_pair` is what ``pipeline match-pair SRC TRG`` runs. It uses the pipeline's own pieces, so a
pair matched here gives the numbers the match stage would give it: the features stage's canvases and
float16 tokens (:func:`stages.features.stage.shard_features`), the catalog's matcher settings
(:mod:`stages.match.settings`) solved by the match stage's :func:`stages.match.stage.solve`, and the
keypoint readout. Nothing is cached: the backbone is loaded for the call.

Outputs in ``out_dir``: ``<src stem>-<trg stem>-<matcher>.png`` per matcher (source points joined to their
predictions, one hue per point) and ``<src stem>-<trg stem>.json`` with the images, the backbone, and per
matcher its parameters, the source points and the predictions, all in original image pixels (x, y).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.cache import atomic_write_bytes
from pipeline.catalog import BackboneSpec, MatcherSpec
from pipeline.errors import DataError, PipelineError
from stages.features.backbones import backbone_key, create_backbone
from stages.features.canvas import CanvasTransform
from stages.features.stage import backbone_options, shard_features, store_params
from stages.match import transfer_keypoints
from stages.match.settings import MatcherSetting, parse_params
from stages.match.stage import readout_options, solve
from stages.report.draw import draw_correspondences

DEFAULT_MATCHERS = ("nn", "gwot")  # what `pipeline match-pair` runs without --matcher


@dataclass(frozen=True)
class MatchPairResult:
    """What :func:`match_pair` wrote and found: the JSON record, one picture per matcher name, the source
    points ``[K, 2]`` and each matcher's predicted target points ``[K, 2]`` (original pixels, x, y)."""

    json_path: Path
    pictures: dict[str, Path]
    points: np.ndarray
    predictions: dict[str, np.ndarray]


def parse_points(texts: Sequence[str]) -> np.ndarray | None:
    """``["10,20 30,40", "50,60"]`` -> ``[[10, 20], [30, 40], [50, 60]]`` float64; None when no text is given.

    Each text holds one or more ``x,y`` pairs separated by spaces (so ``--points "10,20 30,40"`` and
    repeated ``--points 10,20`` both work). Raises PipelineError quoting a malformed pair.
    """
    if not texts:
        return None
    points = []
    for pair in (pair for text in texts for pair in text.split()):
        try:
            x, y = (float(value) for value in pair.split(","))
        except ValueError:
            x = y = float("nan")
        if not (np.isfinite(x) and np.isfinite(y)):
            raise PipelineError(f"--points: {pair!r} is not a point; expected X,Y in source pixels, e.g. 120,64.5")
        points.append([x, y])
    if not points:
        raise PipelineError("--points: no point given; expected X,Y pairs in source pixels, e.g. 120,64.5 30,40")
    return np.asarray(points, dtype=np.float64)


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as [H, W, 3] uint8 RGB; DataError naming the file if missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file is missing" if not path.exists() else "not a file")
    try:
        with Image.open(path) as file:
            return np.array(file.convert("RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(path, f"not a readable image ({error})") from None


def point_grid(width: int, height: int, n: int) -> np.ndarray:
    """``n x n`` points [n*n, 2]: the centres of a regular ``n x n`` tiling of a ``width x height`` image."""
    if n < 1:
        raise PipelineError(f"grid_points must be >= 1, got {n}")
    xs = (np.arange(n) + 0.5) * width / n - 0.5
    ys = (np.arange(n) + 0.5) * height / n - 0.5
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def check_points(points: np.ndarray, width: int, height: int, path: Path) -> np.ndarray:
    """``points`` as [K, 2] float64 if each lies on the ``width x height`` source image (pixel centres
    within half a pixel of the border count); PipelineError naming the first point outside and the file."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise PipelineError(f"points must be a non-empty [K, 2] array of (x, y), got shape {list(points.shape)}")
    x, y = points[:, 0], points[:, 1]
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    if not inside.all():
        bad = points[~inside][0]
        raise PipelineError(
            f"point ({bad[0]:g}, {bad[1]:g}) lies outside the source image {path} ({width}x{height} px: "
            f"x must be in [-0.5, {width - 0.5:g}], y in [-0.5, {height - 0.5:g}])"
            + (f"; {int((~inside).sum())} points are outside" if (~inside).sum() > 1 else "")
        )
    return points


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def match_pair(
    src_path: str | Path,
    trg_path: str | Path,
    *,
    backbone: BackboneSpec,
    matchers: Sequence[MatcherSpec],
    points: np.ndarray | None,
    out_dir: str | Path,
    device: str | None = None,
    grid_points: int = 8,
) -> MatchPairResult:
    """Match the images at ``src_path`` and ``trg_path`` with every matcher; write pictures and a JSON record.

    ``points [K, 2]`` (x, y) are source pixels to transfer; None takes a ``grid_points x grid_points``
    grid over the source image (:func:`point_grid`). ``device`` defaults to ``cuda`` when available, else
    ``cpu``. Raises DataError for an unreadable image, PipelineError for a point outside the source image
    and CatalogError for invalid matcher parameters (before any model is loaded).
    """
    src_path, trg_path, out_dir = Path(src_path), Path(trg_path), Path(out_dir)
    if not matchers:
        raise PipelineError("no matcher given; pass at least one catalog matcher (e.g. nn, gwot)")
    parsed = {matcher.name: (matcher, parse_params(matcher)) for matcher in matchers}
    src_image, trg_image = read_image(src_path), read_image(trg_path)
    src_height, src_width = src_image.shape[:2]
    if points is None:
        points = point_grid(src_width, src_height, grid_points)
    points = check_points(points, src_width, src_height, src_path)

    device = device or _default_device()
    # Mirrored features only for flip-aware matchers, whatever the catalog's `flip`.
    spec = dataclasses.replace(backbone, flip=any(params.needs_flipped for _, params in parsed.values()))
    model = create_backbone(spec.model, **backbone_options(spec), device=device)
    # The features stage would store these very tokens (float16, as here) under this key and parameters.
    params = store_params(spec, device)
    store_key = backbone_key(params)
    transforms = [
        CanvasTransform.fit(image.shape[1], image.shape[0], spec.image_size, model.patch_size)
        for image in (src_image, trg_image)
    ]
    features = shard_features([src_image, trg_image], transforms, model, batch_size=spec.batch_size)
    tokens = torch.from_numpy(features.tokens.astype(np.float32)).to(device)
    flipped = None
    if features.tokens_flipped is not None:
        flipped = torch.from_numpy(features.tokens_flipped[:1].astype(np.float32)).to(device)
    valid = torch.from_numpy(features.valid).to(device)

    stem = f"{src_path.stem}-{trg_path.stem}"
    random_tag = " - RANDOM WEIGHTS: meaningless" if model.random_weights else ""
    pictures, predictions, records = {}, {}, {}
    for name, (matcher, matcher_params) in parsed.items():
        setting = MatcherSetting(name=name, method=matcher.method, params=matcher_params, backbone_key=store_key)
        scores = solve(setting, tokens[:1], tokens[1:], valid[:1], valid[1:], flipped).scores[0]
        predicted = transfer_keypoints(scores, points, *transforms, **readout_options(setting))
        predictions[name] = predicted
        title = f"{name} ({matcher.method}) on {backbone.name}{random_tag}"
        picture = out_dir / f"{stem}-{name}.png"
        pictures[name] = draw_correspondences(src_image, trg_image, points, predicted, title=title, path=picture)
        records[name] = {
            "method": matcher.method,
            "key": setting.key,
            "params": asdict(matcher_params),
            "points": points.tolist(),
            "predictions": predicted.tolist(),
        }

    record = {
        "src": {"path": str(src_path.resolve()), "width": src_width, "height": src_height},
        "trg": {"path": str(trg_path.resolve()), "width": trg_image.shape[1], "height": trg_image.shape[0]},
        "backbone": {
            "name": backbone.name,
            "key": store_key,
            "params": params,
            "random_weights": model.random_weights,
            "device": str(model.device),
        },
        "matchers": records,
    }
    json_path = out_dir / f"{stem}.json"
    atomic_write_bytes(json_path, (json.dumps(record, indent=2) + "\n").encode())
    return MatchPairResult(json_path=json_path, pictures=pictures, points=points, predictions=predictions)
